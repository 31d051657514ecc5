//! The versioned migrations of the PostgreSQL relay schema, and the one
//! function that applies them.
//!
//! Each migration is SQL run once, in order, inside the same transaction as
//! the row that records it in `relay_migrations`: a schema is at version
//! `n` exactly when rows `1..=n` are there. Concurrent nodes starting at
//! once serialise on a transaction-scoped advisory lock keyed by the
//! schema's name, so each migration runs once.
//!
//! A migration, once released, is never edited: a change is a new one
//! appended to [`MIGRATIONS`].

use tokio_postgres::Client;

use super::PostgresOpenError;

/// The schema version this build writes, and the newest it runs on.
pub const POSTGRES_SCHEMA_VERSION: u32 = 1;

/// One step of the schema: its version, a name for the operator, and its
/// SQL, in which `{schema}` stands for the (validated) schema name.
struct Migration {
    version: u32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in version order, from 1 without gaps.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "stores, log, mailboxes",
    sql: MIGRATION_1,
}];

const _: () = assert!(
    MIGRATIONS.len() == POSTGRES_SCHEMA_VERSION as usize,
    "one migration per version, the last one current"
);

/// Version 1. What the relay may know and nothing more: store ids, access
/// fingerprints, heads and counters; per log entry its locator, precedence
/// (HLC, origin device, epoch: the envelope's clear header), epoch, size,
/// arrival time and the sealed envelope; mailbox items as opaque payloads.
/// No column can hold a path, a key or plaintext.
///
/// `relay_log` is both the log and the per-locator index: its primary key
/// orders a store's log by seq, and the unique `(store_id, locator)`
/// constraint holds one entry per locator (invariant 1 of the relay module),
/// which an append replaces in place with the new seq.
///
/// Envelopes are ciphertext: `STORAGE EXTERNAL` keeps PostgreSQL from
/// trying to compress them.
const MIGRATION_1: &str = r#"
CREATE TABLE {schema}.relay_stores (
    store_id bytea PRIMARY KEY CHECK (octet_length(store_id) = 16),
    access_fingerprint bytea NOT NULL CHECK (octet_length(access_fingerprint) = 32),
    head bigint NOT NULL DEFAULT 0 CHECK (head >= 0),
    entries bigint NOT NULL DEFAULT 0 CHECK (entries >= 0 AND entries <= head),
    envelope_bytes bigint NOT NULL DEFAULT 0 CHECK (envelope_bytes >= 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {schema}.relay_log (
    store_id bytea NOT NULL REFERENCES {schema}.relay_stores (store_id),
    seq bigint NOT NULL CHECK (seq > 0),
    locator bytea NOT NULL CHECK (octet_length(locator) = 32),
    precedence bytea NOT NULL CHECK (octet_length(precedence) = 30),
    epoch bigint NOT NULL CHECK (epoch >= 0 AND epoch <= 4294967295),
    size integer NOT NULL CHECK (size >= 0),
    received_at timestamptz NOT NULL DEFAULT now(),
    envelope bytea NOT NULL,
    PRIMARY KEY (store_id, seq),
    CONSTRAINT relay_log_one_per_locator UNIQUE (store_id, locator)
);
ALTER TABLE {schema}.relay_log ALTER COLUMN envelope SET STORAGE EXTERNAL;

CREATE TABLE {schema}.relay_mailboxes (
    store_id bytea NOT NULL REFERENCES {schema}.relay_stores (store_id),
    mailbox bytea NOT NULL CHECK (octet_length(mailbox) = 16),
    last_seq bigint NOT NULL CHECK (last_seq >= 0),
    held bigint NOT NULL CHECK (held >= 0 AND held <= last_seq),
    PRIMARY KEY (store_id, mailbox)
);

CREATE TABLE {schema}.relay_mailbox_items (
    store_id bytea NOT NULL,
    mailbox bytea NOT NULL,
    seq bigint NOT NULL CHECK (seq > 0),
    received_at timestamptz NOT NULL DEFAULT now(),
    payload bytea NOT NULL,
    PRIMARY KEY (store_id, mailbox, seq),
    FOREIGN KEY (store_id, mailbox) REFERENCES {schema}.relay_mailboxes (store_id, mailbox)
);
ALTER TABLE {schema}.relay_mailbox_items ALTER COLUMN payload SET STORAGE EXTERNAL;
"#;

/// Brings `schema` to [`POSTGRES_SCHEMA_VERSION`], creating it if absent.
///
/// Refuses a schema a newer relay migrated ([`PostgresOpenError::NewerSchema`])
/// without changing it. Runs in one transaction: a failed migration leaves
/// the schema at the version it had.
pub(super) async fn migrate(client: &mut Client, schema: &str) -> Result<(), PostgresOpenError> {
    let failed = |step: &'static str| {
        move |source: tokio_postgres::Error| PostgresOpenError::Migrate {
            schema: schema.to_owned(),
            step,
            source,
        }
    };
    let txn = client
        .transaction()
        .await
        .map_err(failed("begin a transaction"))?;
    txn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('persist-relay/migrate/' || $1::text))",
        &[&schema],
    )
    .await
    .map_err(failed("take the migration lock"))?;
    txn.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.relay_migrations (
             version integer PRIMARY KEY CHECK (version > 0),
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(failed("create the schema and relay_migrations"))?;
    let found: i32 = txn
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {schema}.relay_migrations"),
            &[],
        )
        .await
        .map_err(failed("read the schema version"))?
        .get(0);
    // A negative version cannot be written (CHECK); treat it as 0 anyway.
    let found = u32::try_from(found).unwrap_or(0);
    if found > POSTGRES_SCHEMA_VERSION {
        return Err(PostgresOpenError::NewerSchema {
            schema: schema.to_owned(),
            found,
            supported: POSTGRES_SCHEMA_VERSION,
        });
    }
    for migration in MIGRATIONS.iter().filter(|m| m.version > found) {
        txn.batch_execute(&migration.sql.replace("{schema}", schema))
            .await
            .map_err(failed(migration.name))?;
        let version = i32::try_from(migration.version).unwrap_or(i32::MAX);
        txn.execute(
            &format!("INSERT INTO {schema}.relay_migrations (version, name) VALUES ($1, $2)"),
            &[&version, &migration.name],
        )
        .await
        .map_err(failed("record the migration"))?;
    }
    txn.commit().await.map_err(failed("commit the migrations"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version as usize, i + 1, "{}", migration.name);
            assert!(migration.sql.contains("{schema}."), "tables are qualified");
        }
    }
}
