//! [`PostgresRelay`]: the relay backend on PostgreSQL, so that several
//! stateless relay nodes can serve the same stores from one database.
//!
//! Semantics are the `relay` module's (and the redb backend's), checked by
//! the same conformance suite. This module says how PostgreSQL keeps them.
//!
//! # Schema
//!
//! One PostgreSQL schema (default [`POSTGRES_DEFAULT_SCHEMA`]) per relay
//! cluster, created and migrated by the relay itself (`migrations`
//! module): versions recorded in `relay_migrations`, a newer version
//! refused ([`PostgresOpenError::NewerSchema`]). Version 1:
//!
//! | table | holds | key |
//! |---|---|---|
//! | `relay_stores` | store id, access fingerprint, head, live entries and their envelope bytes, created at | store id |
//! | `relay_log` | store id, seq, locator, precedence (30 bytes, sorting like [`Precedence`]), epoch, size, received at, envelope | (store id, seq); unique (store id, locator) |
//! | `relay_mailboxes` | store id, mailbox device id, last seq handed out, items held | (store id, mailbox) |
//! | `relay_mailbox_items` | store id, mailbox, seq, received at, payload | (store id, mailbox, seq) |
//!
//! That is all a relay may know: ids, fingerprints, sequence numbers, clear
//! envelope headers' precedence, sizes, times, and opaque bytes. No column
//! can hold a path, a key or plaintext. `relay_log` is the log and the
//! per-locator index at once: one row per locator (the unique constraint),
//! which an accepted append rewrites in place with its new seq. Times are
//! the database's `now()`, never a node's clock.
//!
//! # Sequence numbers under concurrent nodes
//!
//! An append is one transaction on one pooled connection:
//!
//! 1. `SELECT head FROM relay_stores WHERE store_id = $1 FOR NO KEY UPDATE`
//!    takes the store's row lock, held until commit: appends to one store,
//!    from any node, run one at a time, and the next one's lock returns the
//!    head its predecessor committed (READ COMMITTED re-reads a row whose
//!    lock it waited for).
//! 2. It then reads the precedence held by each locator of the call. That
//!    is a new statement, so a new snapshot taken after the lock: it sees
//!    every append committed before.
//! 3. In Rust, exactly as the redb backend: each entry either loses to
//!    what its locator holds (stale) or takes `head + 1`.
//! 4. One `INSERT ... ON CONFLICT (store_id, locator) DO UPDATE` writes the
//!    winners, one `UPDATE relay_stores` sets the head and counters, and
//!    `pg_notify` queues the new head; then COMMIT.
//!
//! So seqs of a store are assigned `head + 1, head + 2, ...` by one
//! transaction at a time, from a head that is the last committed one:
//! without gaps, never twice. A failed transaction rolls back whole, seqs
//! included. Appends to different stores do not wait for each other. The
//! lock is `NO KEY UPDATE`, which leaves foreign-key checks (mailboxes of
//! the same store) unblocked.
//!
//! An append whose COMMIT was sent but whose answer was lost reports
//! [`RelayError::Unavailable`] and may have committed: retried, its
//! entries come back stale (same precedence), so nothing is stored twice.
//!
//! # Fan-out
//!
//! The append's transaction sends `NOTIFY persist_<schema>,
//! '<store hex>:<head>'`, which PostgreSQL delivers on commit, in commit
//! order; every node LISTENs on one dedicated connection and raises its
//! [`RelayBackend::watch`] channels (`fanout` module, which also says how
//! notifications lost while that connection is down are made up for). The
//! appending node publishes at once as well. [`RelayBackend::watch`] cannot
//! wait for the database: it starts at the head this node last saw for the
//! store, or at 0 (then a query in the background raises it), which the
//! trait allows as long as the subscriber reads the head after subscribing.
//!
//! A [`RelayBackend::rekey`] is one transaction too: it locks the store's
//! row (`FOR NO KEY UPDATE`, as an append does), compares the stored
//! fingerprint with the caller's in constant time, updates it, and sends
//! `NOTIFY persist_<schema>, '<store hex>:rekey'` (no fingerprint), on
//! which every node moves its [`RelayBackend::access_changes`] channel for
//! the store. Nodes that predate rekeys read no head from that payload and
//! ignore it. The rekeying node moves its own channel at once as well.
//! Until the notification reaches another node (normally milliseconds
//! after the commit), that node's sessions with the old credential are
//! still served: that is the window of cross-node revocation. While a
//! node's LISTEN connection is down it hears no rekey at all; once it is
//! back, the node moves the channel of every store someone watches, so
//! that every session re-checks its credential at its next request.
//!
//! Every transaction that notifies takes PostgreSQL's notification-queue
//! lock for its commit, so commits of appends serialise briefly across the
//! whole database; the ingest benchmark (`benches/relay_ingest.rs`) shows
//! what that costs.
//!
//! # Failure
//!
//! Every database failure — refused connection, lost connection, timeout,
//! a statement error — is [`RelayError::Unavailable`]: retryable, with the
//! database's words for the operator, and nothing of the failed call was
//! applied (but for the lost COMMIT answer above). Nothing here panics.
//! The pool drops closed connections when handing them out and opens new
//! ones, so the node recovers by itself once the database is back; the
//! LISTEN connection reconnects with a bounded backoff
//! ([`PostgresRelay::is_listening`] tells whether fan-out is live).
//!
//! # Limits
//!
//! - TLS: connections use no TLS (`NoTls`), right for a database on the
//!   same host or a private network. A URL with `sslmode=require` is
//!   refused ([`PostgresOpenError::TlsUnsupported`]) rather than silently
//!   downgraded; TLS needs a rustls connector (tokio-postgres-rustls) here.
//! - [`RelayBackend::stats`] sums per-store counters: O(stores), not O(1)
//!   as on redb. A single cluster-wide counter row would serialise every
//!   append of every store on every node.
//! - LISTEN/NOTIFY exists on PostgreSQL itself; "Postgres-compatible"
//!   distributed databases mostly lack it.

mod fanout;
mod migrations;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use persist_core::lww::{Precedence, wins};
use persist_core::protocol::{LogEntry, MAILBOX_ITEMS_MAX, MailboxItem};
use persist_core::{DeviceId, Locator, StoreId};
use tokio::sync::watch;
use tokio_postgres::NoTls;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;

use self::fanout::Heads;
use super::page::Pager;
use super::precedence;
use super::watchers::Watchers;
use super::{
    Appended, Incoming, MAILBOX_FETCH_BYTES_TARGET, MAILBOX_FETCH_ITEMS_MAX, PULL_BYTES_TARGET_MAX,
    PULL_ENTRIES_MAX, Page, RelayBackend, RelayError, RelayStats, StoreAccess, check_append,
    check_mailbox_payload, fingerprints_match,
};

pub use self::migrations::POSTGRES_SCHEMA_VERSION;

/// The schema a relay uses when given none.
pub const POSTGRES_DEFAULT_SCHEMA: &str = "persist_relay";

/// Longest schema name accepted: the NOTIFY channel (`persist_` + schema)
/// and the application name must stay within PostgreSQL's 63-byte names.
pub const POSTGRES_SCHEMA_NAME_BYTES_MAX: usize = 48;

/// Pooled connections per node: operations in flight at once. PostgreSQL
/// allows 100 connections by default; a few nodes of 16 (and one LISTEN
/// connection each) stay well inside.
pub const POOL_CONNECTIONS_MAX: usize = 16;

/// Connecting to the database gives up after this (unless the URL sets
/// `connect_timeout`): an operation fails as unavailable rather than hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an operation waits for a pooled connection when all are busy.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection whose sent data goes unacknowledged this long is dead
/// (TCP_USER_TIMEOUT): a silently vanished database fails operations in
/// bounded time instead of hanging them.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle time before TCP keepalives probe a connection, so that an idle
/// LISTEN connection to a vanished database is noticed.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(15);
/// How long [`PostgresRelay::connect`] waits for the LISTEN connection.
const LISTEN_READY_TIMEOUT: Duration = Duration::from_secs(10);

const _: () = assert!(
    "persist_".len() + POSTGRES_SCHEMA_NAME_BYTES_MAX <= 63,
    "channel names are identifiers"
);

/// Connecting a [`PostgresRelay`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresOpenError {
    /// The connection string is not a PostgreSQL URL or key=value string.
    /// (Not echoed: it may hold a password.)
    #[error("the PostgreSQL connection string is invalid: {source}")]
    InvalidUrl {
        /// The parser's complaint.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The schema name is not a plain lowercase identifier.
    #[error(
        "schema name {schema:?} is not allowed: use 1 to {max} characters a-z, 0-9 or _, not \
         starting with a digit",
        max = POSTGRES_SCHEMA_NAME_BYTES_MAX
    )]
    InvalidSchema {
        /// The name given.
        schema: String,
    },
    /// The URL asks for TLS, which this build does not offer.
    #[error(
        "the PostgreSQL URL requires TLS (sslmode=require), which this relay does not support \
         yet: connect over a private network or localhost with sslmode=disable or prefer"
    )]
    TlsUnsupported,
    /// The database could not be reached or refused the login.
    #[error("cannot connect to PostgreSQL: {source}")]
    Connect {
        /// What failed.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Creating or migrating the schema failed; it is left as it was.
    #[error("cannot migrate relay schema {schema:?} ({step}): {source}")]
    Migrate {
        /// The schema.
        schema: String,
        /// The step that failed.
        step: &'static str,
        /// The database's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The schema was migrated by a newer relay. It is left untouched.
    #[error(
        "relay schema {schema:?} is at version {found}, written by a newer Persist relay (this \
         build runs up to {supported}): upgrade the relay"
    )]
    NewerSchema {
        /// The schema.
        schema: String,
        /// Its version.
        found: u32,
        /// [`POSTGRES_SCHEMA_VERSION`].
        supported: u32,
    },
    /// The connection pool could not be built.
    #[error("cannot set up the PostgreSQL connection pool: {detail}")]
    Pool {
        /// What failed.
        detail: String,
    },
    /// The LISTEN connection, which carries other nodes' appends, did not
    /// come up in time.
    #[error("the PostgreSQL LISTEN connection did not come up within {0:?}")]
    Listen(Duration),
}

/// The relay backend on PostgreSQL. See the module docs for the schema, the
/// concurrency argument and failure handling.
///
/// Needs a tokio runtime: [`PostgresRelay::connect`] spawns the LISTEN
/// task and the pool's connection tasks on the current one. Dropping the
/// relay stops the LISTEN task and closes the pool.
pub struct PostgresRelay {
    shared: Arc<Shared>,
    listening: watch::Receiver<bool>,
    listener: tokio::task::JoinHandle<()>,
}

/// What the relay's operations, its background head reads and the LISTEN
/// task share.
struct Shared {
    pool: Pool,
    /// With the schema on the search path, the application name and the
    /// timeouts set.
    pg_config: tokio_postgres::Config,
    schema: String,
    /// The NOTIFY channel: `persist_<schema>`.
    channel: String,
    heads: Heads,
    /// Per store, moved on by every rekey heard of (`fanout`).
    access: Watchers,
}

impl PostgresRelay {
    /// Connects to the database at `url` (a `postgres://` URL or a libpq
    /// key=value string), creates or migrates `schema` (default
    /// [`POSTGRES_DEFAULT_SCHEMA`]), and starts listening for other nodes'
    /// appends.
    ///
    /// Errors: [`PostgresOpenError`]; a schema of a newer relay is refused
    /// and left unchanged.
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<Self, PostgresOpenError> {
        let schema = schema.unwrap_or(POSTGRES_DEFAULT_SCHEMA);
        check_schema_name(schema)?;
        let mut pg_config: tokio_postgres::Config = url
            .parse()
            .map_err(|source| PostgresOpenError::InvalidUrl { source })?;
        if pg_config.get_ssl_mode() == SslMode::Require {
            return Err(PostgresOpenError::TlsUnsupported);
        }
        let options = match pg_config.get_options() {
            Some(options) if !options.trim().is_empty() => {
                format!("{options} -c search_path={schema}")
            }
            _ => format!("-c search_path={schema}"),
        };
        pg_config.options(options);
        if pg_config.get_application_name().is_none() {
            // Tells an operator (and pg_stat_activity) which relay this is.
            pg_config.application_name(format!("persist-relay {schema}"));
        }
        if pg_config.get_connect_timeout().is_none() {
            pg_config.connect_timeout(CONNECT_TIMEOUT);
        }
        if pg_config.get_tcp_user_timeout().is_none() {
            pg_config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        pg_config.keepalives_idle(KEEPALIVES_IDLE);

        let (mut client, connection) = pg_config
            .connect(NoTls)
            .await
            .map_err(|source| PostgresOpenError::Connect { source })?;
        let driver = tokio::spawn(connection);
        let migrated = migrations::migrate(&mut client, schema).await;
        drop(client);
        // The connection ends once its client is gone; how is of no interest.
        let _ = driver.await;
        migrated?;

        let manager = Manager::from_config(
            pg_config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_CONNECTIONS_MAX)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|err| PostgresOpenError::Pool {
                detail: err.to_string(),
            })?;
        let shared = Arc::new(Shared {
            pool,
            pg_config,
            schema: schema.to_owned(),
            channel: format!("persist_{schema}"),
            heads: Heads::new(),
            access: Watchers::new(),
        });
        let (listening_tx, listening) = watch::channel(false);
        let listener = tokio::spawn(fanout::listen(shared.clone(), listening_tx));
        let relay = PostgresRelay {
            shared,
            listening,
            listener,
        };
        let mut ready = relay.listening.clone();
        match tokio::time::timeout(LISTEN_READY_TIMEOUT, ready.wait_for(|up| *up)).await {
            Ok(Ok(_)) => Ok(relay),
            _ => Err(PostgresOpenError::Listen(LISTEN_READY_TIMEOUT)),
        }
    }

    /// The schema this relay keeps its tables in.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// Whether the LISTEN connection is up, so that other nodes' appends
    /// reach this node's watchers now. False while it reconnects.
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, RelayError> {
        self.shared.client().await
    }

    /// Runs the append transaction (module docs, "Sequence numbers").
    async fn append_now(
        &self,
        store: &StoreId,
        entries: &[Incoming],
    ) -> Result<Appended, RelayError> {
        let mut client = self.client().await?;
        let lock = client.prepare_cached(SQL_LOCK_STORE).await.map_err(db)?;
        let held_sql = client.prepare_cached(SQL_HELD).await.map_err(db)?;
        let upsert = client.prepare_cached(SQL_UPSERT_LOG).await.map_err(db)?;
        let update = client.prepare_cached(SQL_UPDATE_STORE).await.map_err(db)?;
        let notify = client.prepare_cached(SQL_NOTIFY).await.map_err(db)?;
        let txn = client.transaction().await.map_err(db)?;

        let store_key = store.0.as_slice();
        let locators: Vec<&[u8]> = entries.iter().map(|e| e.locator.0.as_slice()).collect();
        // Sent together: the server runs the second after the first holds
        // the lock, in a snapshot taken then.
        let lock_params: [&(dyn ToSql + Sync); 1] = [&store_key];
        let held_params: [&(dyn ToSql + Sync); 2] = [&store_key, &locators];
        let (locked, held_rows) = tokio::try_join!(
            txn.query_opt(&lock, &lock_params),
            txn.query(&held_sql, &held_params),
        )
        .map_err(db)?;
        // On an error `txn` is dropped, which queues a ROLLBACK; the early
        // returns that are answers roll back before answering, so that no
        // lock outlives the call.
        let Some(locked) = locked else {
            txn.rollback().await.map_err(db)?;
            return Err(RelayError::UnknownStore);
        };
        let mut head = seq_from_db(locked.try_get(0).map_err(db)?, "head")?;
        let mut held: BTreeMap<Locator, (Precedence, u64)> = BTreeMap::new();
        for row in &held_rows {
            let locator = Locator(fixed(row.try_get(0).map_err(db)?, "locator")?);
            let bytes = fixed(row.try_get(1).map_err(db)?, "precedence")?;
            let size = seq_from_db(i64::from(row.try_get::<_, i32>(2).map_err(db)?), "size")?;
            held.insert(locator, (precedence::decode(&bytes), size));
        }

        let (mut accepted, mut stale) = (0u32, 0u32);
        let mut winners: BTreeMap<Locator, (u64, &Incoming)> = BTreeMap::new();
        for entry in entries {
            let current = match winners.get(&entry.locator) {
                Some((_, earlier)) => Some(earlier.precedence),
                None => held.get(&entry.locator).map(|(p, _)| *p),
            };
            if current.is_some_and(|current| !wins(entry.precedence, current)) {
                stale += 1;
                continue;
            }
            head = next_seq(head)?;
            winners.insert(entry.locator, (head, entry));
            accepted += 1;
        }
        let appended = Appended {
            accepted,
            stale,
            head,
        };
        if accepted == 0 {
            txn.rollback().await.map_err(db)?;
            return Ok(appended);
        }

        let mut new_entries = 0i64;
        let mut bytes_delta = 0i64;
        let mut seqs = Vec::with_capacity(winners.len());
        let mut locators = Vec::with_capacity(winners.len());
        let mut precedences = Vec::with_capacity(winners.len());
        let mut epochs = Vec::with_capacity(winners.len());
        let mut sizes = Vec::with_capacity(winners.len());
        let mut envelopes = Vec::with_capacity(winners.len());
        for (locator, (seq, entry)) in &winners {
            let size = i32::try_from(entry.envelope.len())
                .map_err(|_| damaged("an envelope larger than 2 GiB passed the bounds check"))?;
            match held.get(locator) {
                Some((_, old_size)) => bytes_delta -= seq_to_db(*old_size)?,
                None => new_entries += 1,
            }
            bytes_delta += i64::from(size);
            seqs.push(seq_to_db(*seq)?);
            locators.push(locator.0.as_slice());
            precedences.push(precedence::encode(entry.precedence).to_vec());
            epochs.push(i64::from(entry.precedence.epoch.0));
            sizes.push(size);
            envelopes.push(entry.envelope.as_slice());
        }
        let head_db = seq_to_db(head)?;
        let payload = fanout::payload(store, head);
        let upsert_params: [&(dyn ToSql + Sync); 7] = [
            &store_key,
            &seqs,
            &locators,
            &precedences,
            &epochs,
            &sizes,
            &envelopes,
        ];
        let update_params: [&(dyn ToSql + Sync); 4] =
            [&store_key, &head_db, &new_entries, &bytes_delta];
        let notify_params: [&(dyn ToSql + Sync); 2] = [&self.shared.channel, &payload];
        tokio::try_join!(
            txn.execute(&upsert, &upsert_params),
            txn.execute(&update, &update_params),
            txn.execute(&notify, &notify_params),
        )
        .map_err(db)?;
        txn.commit().await.map_err(|err| {
            unavailable(
                "commit failed (if only its answer was lost, the append took effect; a retry \
                 finds its entries stale)",
                err,
            )
        })?;
        Ok(appended)
    }
}

impl Shared {
    async fn client(&self) -> Result<deadpool_postgres::Object, RelayError> {
        self.pool
            .get()
            .await
            .map_err(|err| unavailable("no database connection", err))
    }

    /// The store's head, or `None` if it does not exist.
    async fn read_head(&self, store: &StoreId) -> Result<Option<u64>, RelayError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(SQL_HEAD).await.map_err(db)?;
        let row = client
            .query_opt(&statement, &[&store.0.as_slice()])
            .await
            .map_err(db)?;
        row.map(|row| seq_from_db(row.try_get(0).map_err(db)?, "head"))
            .transpose()
    }

    /// Fails with [`RelayError::UnknownStore`] unless the store exists.
    /// (Stores are never deleted, so a store seen once stays.)
    async fn require_store(
        &self,
        client: &deadpool_postgres::Object,
        store: &StoreId,
    ) -> Result<(), RelayError> {
        let statement = client.prepare_cached(SQL_HEAD).await.map_err(db)?;
        match client
            .query_opt(&statement, &[&store.0.as_slice()])
            .await
            .map_err(db)?
        {
            Some(_) => Ok(()),
            None => Err(RelayError::UnknownStore),
        }
    }
}

impl RelayBackend for PostgresRelay {
    async fn open_store(
        &self,
        store: &StoreId,
        access_fingerprint: &[u8; 32],
        may_create: bool,
    ) -> Result<StoreAccess, RelayError> {
        let client = self.client().await?;
        let store_key = store.0.as_slice();
        let admit = |row: Option<tokio_postgres::Row>| -> Result<Option<StoreAccess>, RelayError> {
            let Some(row) = row else {
                return if may_create {
                    Ok(None)
                } else {
                    Err(RelayError::AdmissionRequired)
                };
            };
            let stored: [u8; 32] = fixed(row.try_get(0).map_err(db)?, "access fingerprint")?;
            if !fingerprints_match(&stored, access_fingerprint) {
                return Err(RelayError::Unauthorized);
            }
            Ok(Some(StoreAccess {
                created: false,
                head: seq_from_db(row.try_get(1).map_err(db)?, "head")?,
            }))
        };
        let select = client.prepare_cached(SQL_SELECT_STORE).await.map_err(db)?;
        let found = client.query_opt(&select, &[&store_key]).await.map_err(db)?;
        if let Some(access) = admit(found)? {
            self.shared.heads.publish(store, access.head, true);
            return Ok(access);
        }
        let insert = client.prepare_cached(SQL_INSERT_STORE).await.map_err(db)?;
        let fingerprint = access_fingerprint.as_slice();
        let inserted = client
            .query_opt(&insert, &[&store_key, &fingerprint])
            .await
            .map_err(db)?;
        if inserted.is_some() {
            return Ok(StoreAccess {
                created: true,
                head: 0,
            });
        }
        // Another node created it since the select: admit as it says.
        let found = client.query_opt(&select, &[&store_key]).await.map_err(db)?;
        match admit(found)? {
            Some(access) => Ok(access),
            None => Err(unavailable(
                "store row vanished after a conflicting insert",
                "stores are never deleted",
            )),
        }
    }

    async fn append(
        &self,
        store: &StoreId,
        entries: Vec<Incoming>,
    ) -> Result<Appended, RelayError> {
        check_append(&entries)?;
        let appended = self.append_now(store, &entries).await?;
        if appended.accepted > 0 {
            self.shared.heads.publish(store, appended.head, true);
        }
        Ok(appended)
    }

    async fn pull(
        &self,
        store: &StoreId,
        since: u64,
        limit: usize,
        bytes_target: usize,
    ) -> Result<Page, RelayError> {
        let limit = limit.min(PULL_ENTRIES_MAX);
        let bytes_target = bytes_target.min(PULL_BYTES_TARGET_MAX);
        let client = self.client().await?;
        let statement = client.prepare_cached(SQL_PULL).await.map_err(db)?;
        // One row past the limit tells whether more remain.
        let (limit_db, rows_db, target_db) = (
            count_to_db(limit),
            count_to_db(limit + 1),
            count_to_db(bytes_target),
        );
        let rows = client
            .query(
                &statement,
                &[
                    &store.0.as_slice(),
                    &cursor_to_db(since),
                    &rows_db,
                    &target_db,
                    &limit_db,
                ],
            )
            .await
            .map_err(db)?;
        if rows.is_empty() {
            self.shared.require_store(&client, store).await?;
        }
        let mut pager = Pager::new(limit, bytes_target);
        let mut entries = Vec::new();
        let mut more = false;
        for row in &rows {
            let size = seq_from_db(i64::from(row.try_get::<_, i32>(3).map_err(db)?), "size")?;
            if !pager.admit(usize::try_from(size).unwrap_or(usize::MAX)) {
                more = true;
                break;
            }
            let envelope: Option<Vec<u8>> = row.try_get(2).map_err(db)?;
            entries.push(LogEntry {
                seq: seq_from_db(row.try_get(0).map_err(db)?, "seq")?,
                locator: Locator(fixed(row.try_get(1).map_err(db)?, "locator")?),
                envelope: envelope.ok_or_else(|| damaged("a paged envelope came back empty"))?,
            });
        }
        let cursor = entries.last().map_or(since, |entry| entry.seq);
        Ok(Page {
            entries,
            cursor,
            more,
        })
    }

    async fn head(&self, store: &StoreId) -> Result<u64, RelayError> {
        let head = self
            .shared
            .read_head(store)
            .await?
            .ok_or(RelayError::UnknownStore)?;
        self.shared.heads.publish(store, head, true);
        Ok(head)
    }

    fn watch(&self, store: &StoreId) -> watch::Receiver<u64> {
        let (receiver, known) = self.shared.heads.subscribe(store);
        if !known && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // Unknown here: starts at 0 (see the trait) and rises once read.
            let shared = self.shared.clone();
            let store = *store;
            runtime.spawn(async move {
                if let Ok(Some(head)) = shared.read_head(&store).await {
                    shared.heads.publish(&store, head, false);
                }
            });
        }
        receiver
    }

    async fn mailbox_put(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        payload: Vec<u8>,
    ) -> Result<u64, RelayError> {
        check_mailbox_payload(&payload)?;
        let mut client = self.client().await?;
        self.shared.require_store(&client, store).await?;
        let claim = client.prepare_cached(SQL_MAILBOX_CLAIM).await.map_err(db)?;
        let insert = client
            .prepare_cached(SQL_MAILBOX_INSERT)
            .await
            .map_err(db)?;
        let txn = client.transaction().await.map_err(db)?;
        let (store_key, mailbox_key) = (store.0.as_slice(), mailbox.0.as_slice());
        let items_max = count_to_db(MAILBOX_ITEMS_MAX);
        let Some(claimed) = txn
            .query_opt(&claim, &[&store_key, &mailbox_key, &items_max])
            .await
            .map_err(db)?
        else {
            txn.rollback().await.map_err(db)?;
            return Err(RelayError::MailboxFull {
                max: MAILBOX_ITEMS_MAX,
            });
        };
        let seq: i64 = claimed.try_get(0).map_err(db)?;
        txn.execute(&insert, &[&store_key, &mailbox_key, &seq, &payload])
            .await
            .map_err(db)?;
        txn.commit().await.map_err(db)?;
        seq_from_db(seq, "mailbox seq")
    }

    async fn mailbox_fetch(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<MailboxItem>, RelayError> {
        let limit = limit.min(MAILBOX_FETCH_ITEMS_MAX);
        let client = self.client().await?;
        let statement = client.prepare_cached(SQL_MAILBOX_FETCH).await.map_err(db)?;
        let rows = client
            .query(
                &statement,
                &[
                    &store.0.as_slice(),
                    &mailbox.0.as_slice(),
                    &cursor_to_db(since),
                    &count_to_db(limit + 1),
                    &count_to_db(MAILBOX_FETCH_BYTES_TARGET),
                    &count_to_db(limit),
                ],
            )
            .await
            .map_err(db)?;
        if rows.is_empty() {
            self.shared.require_store(&client, store).await?;
        }
        let mut pager = Pager::new(limit, MAILBOX_FETCH_BYTES_TARGET);
        let mut items = Vec::new();
        for row in &rows {
            let size = seq_from_db(i64::from(row.try_get::<_, i32>(2).map_err(db)?), "size")?;
            if !pager.admit(usize::try_from(size).unwrap_or(usize::MAX)) {
                break;
            }
            let payload: Option<Vec<u8>> = row.try_get(1).map_err(db)?;
            items.push(MailboxItem {
                seq: seq_from_db(row.try_get(0).map_err(db)?, "mailbox seq")?,
                payload: payload
                    .ok_or_else(|| damaged("a fetched mailbox item came back empty"))?,
            });
        }
        Ok(items)
    }

    async fn mailbox_ack(
        &self,
        store: &StoreId,
        mailbox: &DeviceId,
        upto: u64,
    ) -> Result<(), RelayError> {
        let client = self.client().await?;
        self.shared.require_store(&client, store).await?;
        let statement = client.prepare_cached(SQL_MAILBOX_ACK).await.map_err(db)?;
        client
            .execute(
                &statement,
                &[
                    &store.0.as_slice(),
                    &mailbox.0.as_slice(),
                    &cursor_to_db(upto),
                ],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn stats(&self) -> Result<RelayStats, RelayError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(SQL_STATS).await.map_err(db)?;
        let row = client.query_one(&statement, &[]).await.map_err(db)?;
        Ok(RelayStats {
            stores: seq_from_db(row.try_get(0).map_err(db)?, "store count")?,
            entries: seq_from_db(row.try_get(1).map_err(db)?, "entry count")?,
            envelope_bytes: seq_from_db(row.try_get(2).map_err(db)?, "envelope bytes")?,
        })
    }

    async fn rekey(
        &self,
        store: &StoreId,
        old: &[u8; 32],
        new: &[u8; 32],
    ) -> Result<(), RelayError> {
        let mut client = self.client().await?;
        let lock = client
            .prepare_cached(SQL_LOCK_FINGERPRINT)
            .await
            .map_err(db)?;
        let update = client
            .prepare_cached(SQL_UPDATE_FINGERPRINT)
            .await
            .map_err(db)?;
        let notify = client.prepare_cached(SQL_NOTIFY).await.map_err(db)?;
        let txn = client.transaction().await.map_err(db)?;
        let store_key = store.0.as_slice();
        let Some(row) = txn.query_opt(&lock, &[&store_key]).await.map_err(db)? else {
            txn.rollback().await.map_err(db)?;
            return Err(RelayError::UnknownStore);
        };
        let stored: [u8; 32] = fixed(row.try_get(0).map_err(db)?, "access fingerprint")?;
        if !fingerprints_match(&stored, old) {
            txn.rollback().await.map_err(db)?;
            return Err(RelayError::Unauthorized);
        }
        let new_key = new.as_slice();
        let payload = fanout::rekey_payload(store);
        let update_params: [&(dyn ToSql + Sync); 2] = [&store_key, &new_key];
        let notify_params: [&(dyn ToSql + Sync); 2] = [&self.shared.channel, &payload];
        tokio::try_join!(
            txn.execute(&update, &update_params),
            txn.execute(&notify, &notify_params),
        )
        .map_err(db)?;
        txn.commit().await.map_err(|err| {
            unavailable(
                "commit failed (if only its answer was lost, the rekey took effect: the new \
                 credential opens the store)",
                err,
            )
        })?;
        self.shared.access.bump(store);
        Ok(())
    }

    fn access_changes(&self, store: &StoreId) -> watch::Receiver<u64> {
        self.shared.access.subscribe(store, || 0)
    }
}

impl fmt::Debug for PostgresRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresRelay")
            .field("schema", &self.shared.schema)
            .field("listening", &self.is_listening())
            .field("pool", &self.shared.pool.status())
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresRelay {
    fn drop(&mut self) {
        self.listener.abort();
        self.shared.pool.close();
    }
}

// The statements. Tables are unqualified: every connection has the relay's
// schema as its search path.

/// The store's row lock, held to commit: appends to one store take turns.
const SQL_LOCK_STORE: &str = "SELECT head FROM relay_stores WHERE store_id = $1 FOR NO KEY UPDATE";
/// What the call's locators hold now.
const SQL_HELD: &str = "SELECT locator, precedence, size FROM relay_log \
     WHERE store_id = $1 AND locator = ANY($2)";
/// The winners, one row per locator, replacing what it held.
const SQL_UPSERT_LOG: &str = "INSERT INTO relay_log \
         (store_id, seq, locator, precedence, epoch, size, envelope) \
     SELECT $1, * FROM unnest($2::bigint[], $3::bytea[], $4::bytea[], $5::bigint[], \
         $6::integer[], $7::bytea[]) \
     ON CONFLICT (store_id, locator) DO UPDATE SET seq = excluded.seq, \
         precedence = excluded.precedence, epoch = excluded.epoch, size = excluded.size, \
         received_at = now(), envelope = excluded.envelope";
const SQL_UPDATE_STORE: &str = "UPDATE relay_stores SET head = $2, entries = entries + $3, \
     envelope_bytes = envelope_bytes + $4 WHERE store_id = $1";
const SQL_NOTIFY: &str = "SELECT pg_notify($1, $2)";
const SQL_HEAD: &str = "SELECT head FROM relay_stores WHERE store_id = $1";
/// The store's fingerprint, its row locked to commit: a rekey's compare
/// and swap see no other change in between (nor an append, briefly).
const SQL_LOCK_FINGERPRINT: &str =
    "SELECT access_fingerprint FROM relay_stores WHERE store_id = $1 FOR NO KEY UPDATE";
const SQL_UPDATE_FINGERPRINT: &str =
    "UPDATE relay_stores SET access_fingerprint = $2 WHERE store_id = $1";
const SQL_SELECT_STORE: &str =
    "SELECT access_fingerprint, head FROM relay_stores WHERE store_id = $1";
const SQL_INSERT_STORE: &str = "INSERT INTO relay_stores (store_id, access_fingerprint) \
     VALUES ($1, $2) ON CONFLICT (store_id) DO NOTHING RETURNING head";
/// A page of the log in one statement (one snapshot): the running byte
/// count decides, in the database, which envelopes come back at all; rows
/// past the byte target or the limit ($5) come with sizes only, so the
/// caller learns that more remain without receiving them.
const SQL_PULL: &str = "WITH page AS ( \
         SELECT seq, size, row_number() OVER w AS rank, sum(size) OVER w AS running \
         FROM relay_log WHERE store_id = $1 AND seq > $2 \
         WINDOW w AS (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) \
         ORDER BY seq LIMIT $3) \
     SELECT page.seq, log.locator, \
         CASE WHEN page.rank <= $5 AND (page.rank = 1 OR page.running <= $4) \
             THEN log.envelope END, \
         page.size \
     FROM page JOIN relay_log AS log ON log.store_id = $1 AND log.seq = page.seq \
     ORDER BY page.seq";
/// Takes the mailbox's next seq, unless it holds `$3` items already (then
/// no row). The row lock it takes orders concurrent puts.
const SQL_MAILBOX_CLAIM: &str = "INSERT INTO relay_mailboxes AS m (store_id, mailbox, last_seq, held) \
     VALUES ($1, $2, 1, 1) \
     ON CONFLICT (store_id, mailbox) DO UPDATE SET last_seq = m.last_seq + 1, held = m.held + 1 \
     WHERE m.held < $3 RETURNING last_seq";
const SQL_MAILBOX_INSERT: &str =
    "INSERT INTO relay_mailbox_items (store_id, mailbox, seq, payload) VALUES ($1, $2, $3, $4)";
/// As [`SQL_PULL`], for mailbox items.
const SQL_MAILBOX_FETCH: &str = "WITH page AS ( \
         SELECT seq, octet_length(payload) AS size, row_number() OVER w AS rank, \
             sum(octet_length(payload)) OVER w AS running \
         FROM relay_mailbox_items WHERE store_id = $1 AND mailbox = $2 AND seq > $3 \
         WINDOW w AS (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) \
         ORDER BY seq LIMIT $4) \
     SELECT page.seq, \
         CASE WHEN page.rank <= $6 AND (page.rank = 1 OR page.running <= $5) \
             THEN item.payload END, \
         page.size \
     FROM page JOIN relay_mailbox_items AS item \
         ON item.store_id = $1 AND item.mailbox = $2 AND item.seq = page.seq \
     ORDER BY page.seq";
/// Deletes the items up to `$3` and counts them off, in one statement; the
/// row stays, so seqs are never reused.
const SQL_MAILBOX_ACK: &str = "WITH gone AS ( \
         DELETE FROM relay_mailbox_items WHERE store_id = $1 AND mailbox = $2 AND seq <= $3 \
         RETURNING seq) \
     UPDATE relay_mailboxes SET held = held - (SELECT count(*) FROM gone) \
     WHERE store_id = $1 AND mailbox = $2 AND EXISTS (SELECT 1 FROM gone)";
const SQL_STATS: &str = "SELECT count(*), coalesce(sum(entries), 0)::bigint, \
     coalesce(sum(envelope_bytes), 0)::bigint FROM relay_stores";

/// Refuses a schema name that is not a plain lowercase identifier: it is
/// spliced into SQL and into the NOTIFY channel name.
fn check_schema_name(schema: &str) -> Result<(), PostgresOpenError> {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    // `pg_` names are reserved for PostgreSQL's own schemas.
    if first_ok
        && rest_ok
        && schema.len() <= POSTGRES_SCHEMA_NAME_BYTES_MAX
        && !schema.starts_with("pg_")
    {
        Ok(())
    } else {
        Err(PostgresOpenError::InvalidSchema {
            schema: schema
                .chars()
                .take(POSTGRES_SCHEMA_NAME_BYTES_MAX + 8)
                .collect(),
        })
    }
}

/// A database failure, for the operator.
fn unavailable(what: &str, err: impl fmt::Display) -> RelayError {
    RelayError::Unavailable(format!("PostgreSQL: {what}: {err}"))
}

fn db(err: tokio_postgres::Error) -> RelayError {
    unavailable("statement failed", err)
}

/// A row that breaks the schema's checks: someone wrote to the tables by
/// hand, or a migration is missing.
fn damaged(detail: &str) -> RelayError {
    RelayError::Unavailable(format!(
        "PostgreSQL relay schema holds an impossible row ({detail}): check the relay tables"
    ))
}

/// A non-negative bigint of the database as a u64.
fn seq_from_db(value: i64, what: &str) -> Result<u64, RelayError> {
    u64::try_from(value).map_err(|_| damaged(&format!("negative {what} {value}")))
}

/// A seq to store: the schema's bigint holds 2^63 - 1 at most.
fn seq_to_db(value: u64) -> Result<i64, RelayError> {
    i64::try_from(value).map_err(|_| damaged(&format!("sequence number {value} beyond bigint")))
}

/// A cursor to compare against: anything above bigint's range is past every
/// stored seq, which `i64::MAX` is too.
fn cursor_to_db(cursor: u64) -> i64 {
    i64::try_from(cursor).unwrap_or(i64::MAX)
}

/// A count (limit, byte target) as bigint; ours are capped far below.
fn count_to_db(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// The sequence number after `last`. 2^63 appends cannot happen, but a
/// damaged row could claim it.
fn next_seq(last: u64) -> Result<u64, RelayError> {
    last.checked_add(1)
        .filter(|&next| i64::try_from(next).is_ok())
        .ok_or_else(|| damaged(&format!("head {last} has no successor")))
}

/// A fixed-size byte column.
fn fixed<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N], RelayError> {
    bytes
        .try_into()
        .map_err(|_| damaged(&format!("{what} of {} bytes, not {N}", bytes.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for good in ["persist_relay", "a", "_x1", &"s".repeat(48)] {
            assert!(check_schema_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1a",
            "Upper",
            "a-b",
            "a;drop",
            "a b",
            "pg_catalog",
            &"s".repeat(49),
        ] {
            assert!(
                matches!(
                    check_schema_name(bad),
                    Err(PostgresOpenError::InvalidSchema { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn conversions_refuse_what_bigint_cannot_hold() {
        assert_eq!(cursor_to_db(u64::MAX), i64::MAX);
        assert!(seq_to_db(u64::MAX).is_err());
        assert!(seq_from_db(-1, "head").is_err());
        assert!(next_seq(i64::MAX as u64).is_err());
        assert_eq!(next_seq(1).ok(), Some(2));
        assert!(fixed::<16>(&[0; 15], "store id").is_err());
    }

    #[tokio::test]
    async fn bad_urls_and_tls_are_refused_before_connecting() {
        let err = PostgresRelay::connect("postgres://x@127.0.0.1:1/db?sslmode=require", None)
            .await
            .unwrap_err();
        assert!(matches!(err, PostgresOpenError::TlsUnsupported), "{err:?}");
        let err = PostgresRelay::connect("postgres://secret-password@[", None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, PostgresOpenError::InvalidUrl { .. }),
            "{err:?}"
        );
        assert!(!err.to_string().contains("secret-password"), "{err}");
        let err = PostgresRelay::connect("postgres://127.0.0.1:1/db", Some("Bad"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, PostgresOpenError::InvalidSchema { .. }),
            "{err:?}"
        );
    }
}
