//! The commands: each opens the store, does one thing, closes the store,
//! and returns what to print on stdout.
//!
//! Only `init` may create a store. Every other command first checks that
//! the database file is there, and opens it with
//! `Config::create_if_missing(false)` too, so that the engine never creates
//! one behind its back; `init` refuses to run where a store already is,
//! except with `--import`, where a copied database is what it re-keys.
//! Commands that only read (`get`, `ls`, `status`, `key export`) open the
//! store read-only; `status` opens it read-write, with sync, when a remote
//! is configured (see [`crate::sync`] for which commands sync, and why).

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use persist::{Config, DB_FILE, OpenError, Remote, Status, Store, SyncConfig, SyncStatus};

use crate::failure::CliError;
use crate::remote::{self, AdmissionSecret, RemoteSpec};
use crate::{json, keys, sync};

/// The store a command works on, and where its device key is.
#[derive(Debug)]
pub(crate) struct Target {
    /// The store directory.
    pub(crate) dir: PathBuf,
    /// The device keyfile; `None` leaves the choice to the engine (OS
    /// keychain, else a keyfile in the default key directory).
    pub(crate) key_file: Option<PathBuf>,
}

/// Whether a command writes to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reads only: the store is opened read-only, so that a `get` never
    /// writes, nor starts background re-encryption.
    Read,
    /// Writes.
    Write,
}

impl Target {
    pub(crate) fn config(&self) -> Config {
        let config = Config::new(&self.dir);
        match &self.key_file {
            Some(path) => config.key_file(path),
            None => config,
        }
    }

    pub(crate) fn db_file(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }

    /// Whether the directory holds a database. An empty file is what an
    /// interrupted creation leaves; the storage layer treats it as no
    /// database either.
    pub(crate) fn has_db(&self) -> bool {
        std::fs::metadata(self.db_file()).is_ok_and(|m| m.is_file() && m.len() > 0)
    }

    /// Fails with "no store" unless the directory holds a database.
    pub(crate) fn require_store(&self) -> Result<(), CliError> {
        if self.has_db() {
            Ok(())
        } else {
            Err(CliError::NoStore {
                dir: self.dir.clone(),
            })
        }
    }

    pub(crate) fn check_is_dir(&self) -> Result<(), CliError> {
        if self.dir.exists() && !self.dir.is_dir() {
            return Err(CliError::NotADirectory {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }
}

/// The remote `init --relay` configures, as given.
#[derive(Debug)]
pub(crate) struct InitRemote {
    /// The relay (or serving device) and how to trust it.
    pub(crate) spec: RemoteSpec,
    /// The operator's admission secret: with it, `init` syncs once, which
    /// creates the store on a relay that admits new stores only with it.
    pub(crate) admission_file: Option<PathBuf>,
}

/// An `InitRemote` checked before the store is touched: a bad URL, pin,
/// CA or secret file leaves nothing behind.
struct InitSync {
    spec: RemoteSpec,
    /// Set when `init` syncs once before returning.
    first_sync: Option<Remote>,
}

impl InitSync {
    fn check(remote: Option<InitRemote>) -> anyhow::Result<Option<InitSync>> {
        let Some(InitRemote {
            spec,
            admission_file,
        }) = remote
        else {
            return Ok(None);
        };
        spec.remote(None)?;
        let first_sync = match admission_file {
            Some(file) => Some(spec.remote(Some(&AdmissionSecret::read(&file)?))?),
            None => None,
        };
        Ok(Some(InitSync { spec, first_sync }))
    }

    /// Opens the store with sync when `init` syncs once.
    fn config(sync: Option<&InitSync>, config: Config) -> Config {
        match sync.and_then(|s| s.first_sync.clone()) {
            Some(remote) => config.sync(SyncConfig::new(remote)),
            None => config,
        }
    }
}

/// `persist init [--relay URL (--pin P | --ca F) [--admission-secret-file
/// F]]`: creates the store, keeps its remote, and prints its ids and key
/// location.
pub(crate) async fn init(
    target: Target,
    name: &str,
    remote: Option<InitRemote>,
) -> anyhow::Result<String> {
    target.check_is_dir()?;
    let db_file = target.db_file();
    if db_file.exists() {
        return Err(CliError::StoreExists { dir: target.dir }.into());
    }
    let sync = InitSync::check(remote)?;
    let dir_existed = target.dir.exists();
    let config = InitSync::config(sync.as_ref(), target.config().name(name));
    let store = match Store::open(config).await {
        Ok(store) => store,
        Err(error) => {
            remove_failed_init(&target.dir, &db_file, dir_existed);
            return Err(error.into());
        }
    };
    let info = store.info().clone();
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "created store at {}", info.path.display());
    ids_text(&mut out, &info);
    let result = keep_remote(&target, &store, sync, &mut out).await;
    finish(store, result).await?;
    Ok(out)
}

/// Saves the remote of `init --relay`, and runs the first sync if asked
/// to; adds what it did to `out`.
async fn keep_remote(
    target: &Target,
    store: &Store,
    sync: Option<InitSync>,
    out: &mut String,
) -> anyhow::Result<()> {
    let Some(InitSync { spec, first_sync }) = sync else {
        return Ok(());
    };
    remote::save(&target.dir, &spec)?;
    let _ = writeln!(out, "remote:     {}", spec.describe());
    if first_sync.is_none() {
        return Ok(());
    }
    let report = store.sync_now().await.with_context(|| {
        format!(
            "the store was created and its remote saved, but the first sync failed: \
             run `persist sync --store {} --admission-secret-file F` once the remote \
             can be reached",
            target.dir.display()
        )
    })?;
    let _ = writeln!(
        out,
        "first sync: pushed {}, pulled {}, held {}, refused {}",
        report.pushed, report.pulled, report.held, report.refused
    );
    Ok(())
}

/// `persist init --import FILE [--passphrase-file F]`: opens the store with
/// the keys of a key export. On an empty directory this device joins the
/// store; on a directory holding a copied database, the copy is re-keyed
/// for this device (its own identity and device key).
pub(crate) async fn init_import(
    target: Target,
    name: &str,
    export_file: &Path,
    passphrase_file: Option<&Path>,
    remote: Option<InitRemote>,
) -> anyhow::Result<String> {
    target.check_is_dir()?;
    // Everything the user gives is read before the store is touched.
    let sync = InitSync::check(remote)?;
    let export = keys::read_export_file(export_file)?;
    let passphrase = match passphrase_file {
        Some(file) => keys::read_passphrase_file(file)?,
        None => keys::read_passphrase_stdin()?,
    };
    let had_store = target.has_db();
    let dir_existed = target.dir.exists();
    let config = target.config().name(name).key(&export, &passphrase);
    let config = InitSync::config(sync.as_ref(), config);
    drop(passphrase);
    let store = match Store::open(config).await {
        Ok(store) => store,
        Err(error) => {
            // A copied database is the user's: it is left as it was (the
            // engine changes nothing in it when an import fails).
            if !had_store {
                remove_failed_init(&target.dir, &target.db_file(), dir_existed);
            }
            return Err(error.into());
        }
    };
    let info = store.info().clone();
    let mut remote_lines = String::new();
    let result = match keep_remote(&target, &store, sync, &mut remote_lines).await {
        Ok(()) => store.status().await.map_err(anyhow::Error::from),
        Err(error) => Err(error),
    };
    let status = finish(store, result).await?;
    let mut out = String::new();
    if had_store {
        let _ = writeln!(
            out,
            "opened the copied store at {} with the imported keys; this device has its own id and device key",
            info.path.display()
        );
    } else {
        let _ = writeln!(
            out,
            "joined store {} at {} with the imported keys",
            info.store_id,
            info.path.display()
        );
    }
    ids_text(&mut out, &info);
    out.push_str(&remote_lines);
    if status.records == 0 {
        let how = if remote_lines.is_empty() {
            "set a remote with `persist remote set`, then run `persist sync`"
        } else {
            "run `persist sync`"
        };
        let _ = writeln!(
            out,
            "records:    0 (none on this device yet: records arrive by sync; {how})"
        );
    } else {
        let _ = writeln!(out, "records:    {}", status.records);
    }
    Ok(out)
}

pub(crate) fn ids_text(out: &mut String, info: &persist::StoreInfo) {
    let _ = writeln!(out, "store id:   {}", info.store_id);
    let _ = writeln!(out, "device id:  {} ({})", info.device_id, info.name);
    let _ = writeln!(
        out,
        "device key: {}",
        info.key_location
            .as_deref()
            .unwrap_or("none (not encrypted)")
    );
}

/// Most bytes of JSON read from stdin by `persist put PATH -`: room for the
/// largest value a record holds (`persist::VALUE_BYTES_MAX` once encoded)
/// written out as JSON text, which is larger than its encoding.
const STDIN_JSON_BYTES_MAX: u64 = 4 * persist::VALUE_BYTES_MAX as u64;

/// `persist put PATH JSON`; a JSON of `-` is read from stdin (for values
/// larger than a command-line argument may be).
pub(crate) async fn put(target: Target, path: &str, text: &str) -> anyhow::Result<String> {
    let stdin_text;
    let text = if text == "-" {
        stdin_text = read_stdin()?;
        stdin_text.as_str()
    } else {
        text
    };
    // Checked before the store is opened: bad input costs no store work.
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|source| CliError::BadJson {
            path: path.to_owned(),
            source,
        })?;
    let store = open_existing(&target, Access::Write).await?;
    let result = store.put(path, &value).await;
    finish(store, result).await?;
    Ok(String::new())
}

/// `persist get PATH`: the value as one line of compact JSON.
pub(crate) async fn get(target: Target, path: &str) -> anyhow::Result<String> {
    let store = open_existing(&target, Access::Read).await?;
    let result = store.get::<ciborium::Value>(path).await;
    match finish(store, result).await? {
        Some(value) => Ok(format!("{}\n", json::from_cbor(value))),
        None => Err(CliError::NotFound {
            path: path.to_owned(),
        }
        .into()),
    }
}

/// `persist rm PATH`. The engine records a deletion even where there is
/// nothing, so the path is read first to report "not found" instead.
pub(crate) async fn rm(target: Target, path: &str) -> anyhow::Result<String> {
    let store = open_existing(&target, Access::Write).await?;
    let existing = match store.get::<ciborium::Value>(path).await {
        Ok(existing) => existing,
        Err(error) => return finish(store, Err(error)).await,
    };
    if existing.is_none() {
        let missing = CliError::NotFound {
            path: path.to_owned(),
        };
        return finish(store, Err(missing)).await;
    }
    let result = store.delete(path).await;
    finish(store, result).await?;
    Ok(String::new())
}

/// `persist ls [PREFIX]`: `PATH<TAB>JSON` lines, sorted by path.
pub(crate) async fn ls(target: Target, prefix: &str) -> anyhow::Result<String> {
    let store = open_existing(&target, Access::Read).await?;
    let result = store.list::<ciborium::Value>(prefix).await;
    let records = finish(store, result).await?;
    let mut out = String::new();
    for (path, value) in records {
        // Paths hold no control characters (the engine refuses them), so
        // neither a tab nor a newline in one can break the line format.
        let _ = writeln!(out, "{path}\t{}", json::from_cbor(value));
    }
    Ok(out)
}

/// `persist status [--json]`.
///
/// With a remote configured, the store is opened with sync (read-write:
/// a read-only store does not sync), and the session is given a moment to
/// connect, so that the `sync` section says where it really stands. The
/// JSON then holds the engine's `SyncStatus` under `"sync"`.
pub(crate) async fn status(target: Target, as_json: bool) -> anyhow::Result<String> {
    target.require_store()?;
    let (status, sync) = match remote::load(&target.dir)? {
        None => {
            let store = open_existing(&target, Access::Read).await?;
            let result = store.status().await;
            (finish(store, result).await?, None)
        }
        Some(spec) => {
            let store = open_syncing(&target, spec.remote(None)?).await?;
            let sync = sync::settled_status(&store).await;
            let result = store.status().await;
            (finish(store, result).await?, sync)
        }
    };
    if as_json {
        let mut value = serde_json::to_value(&status).context("cannot print the status as JSON")?;
        if let (Some(sync), Some(object)) = (&sync, value.as_object_mut()) {
            let sync = serde_json::to_value(sync).context("cannot print the status as JSON")?;
            object.insert(String::from("sync"), sync);
        }
        return Ok(format!("{value}\n"));
    }
    Ok(status_text(&status, sync.as_ref()))
}

fn status_text(status: &Status, sync: Option<&SyncStatus>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "store id:   {}", status.store_id);
    let _ = writeln!(out, "device id:  {} ({})", status.device_id, status.name);
    let _ = writeln!(out, "records:    {}", status.records);
    let _ = writeln!(
        out,
        "encrypted:  {}",
        if status.encrypted { "yes" } else { "no" }
    );
    let _ = writeln!(
        out,
        "device key: {}",
        status
            .key_source
            .as_deref()
            .unwrap_or("none (not encrypted)")
    );
    let _ = writeln!(out, "epoch:      {} (current)", status.current_epoch);
    for epoch in &status.epochs {
        let _ = writeln!(
            out,
            "  epoch {:>4}  {:<9} {} records",
            epoch.epoch, epoch.state, epoch.records
        );
        if epoch.keys > 1 {
            let _ = writeln!(
                out,
                "              {} keys: concurrent rotations on several devices; new writes use {}…",
                epoch.keys,
                epoch.announcement.get(..16).unwrap_or(&epoch.announcement)
            );
        }
        if !epoch.retire_waits_for.is_empty() {
            let due = epoch.retire_due_ms.map_or(String::new(), |ms| {
                format!(", or without them at {}", crate::pairing::utc_time(ms))
            });
            let _ = writeln!(
                out,
                "              retires once these members hold a newer key{due}: {}",
                epoch.retire_waits_for.join(", ")
            );
        }
    }
    let rotation = &status.rotation;
    if rotation.active {
        let _ = writeln!(
            out,
            "rotation:   re-encrypting, {}/{} records resealed",
            rotation.done, rotation.total
        );
    } else {
        // The re-encryption runs only while the store is open read-write;
        // `status` opens it read-only, so a pending one shows here. Counted
        // on the records rather than on the `rotating` state, which the
        // engine can drop early (see `keys::purge_retired`).
        let pending: u64 = status
            .epochs
            .iter()
            .filter(|e| {
                e.epoch != status.current_epoch && e.state != "purged" && e.state != "plain"
            })
            .map(|e| e.records)
            .sum();
        if pending > 0 {
            let _ = writeln!(
                out,
                "rotation:   pending, {pending} records under older epochs to reseal; \
                 it goes on the next time the store is opened read-write"
            );
        }
    }
    if let Some(switch) = &status.relay_switch {
        let who = if switch.by_this_device {
            "this device switches it"
        } else {
            "the revoking device switches it"
        };
        let _ = writeln!(
            out,
            "relay:      access token switch pending (revocation, epoch {}); {who} once \
             every member holds the new keys",
            switch.epoch
        );
        if switch.by_this_device && !switch.waiting_for.is_empty() {
            let _ = writeln!(
                out,
                "            waiting for: {} (members that stay offline past the grace \
                 period must be paired again)",
                switch.waiting_for.join(", ")
            );
        }
    }
    if let Some(sync) = sync {
        sync::status_text(&mut out, sync);
    }
    out
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .take(STDIN_JSON_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .context("cannot read the value from stdin")?;
    if text.len() as u64 > STDIN_JSON_BYTES_MAX {
        return Err(CliError::InputTooLarge {
            max: STDIN_JSON_BYTES_MAX,
        }
        .into());
    }
    Ok(text)
}

/// Opens a store that must already exist.
pub(crate) async fn open_existing(target: &Target, access: Access) -> anyhow::Result<Store> {
    let config = target.config().create_if_missing(false);
    let config = match access {
        Access::Read => config.read_only(),
        Access::Write => config,
    };
    open_checked(target, config).await
}

/// Opens a store that must already exist, read-write, syncing with
/// `remote` in the background until it is closed. The open itself does
/// not wait for the remote: a remote that is down shows in
/// `sync_status` and fails `sync_now`, not the open.
pub(crate) async fn open_syncing(target: &Target, remote: Remote) -> anyhow::Result<Store> {
    let config = target
        .config()
        .create_if_missing(false)
        .sync(SyncConfig::new(remote));
    open_checked(target, config).await
}

async fn open_checked(target: &Target, config: Config) -> anyhow::Result<Store> {
    let no_store = || CliError::NoStore {
        dir: target.dir.clone(),
    };
    if !target.has_db() {
        return Err(no_store().into());
    }
    match Store::open(config).await {
        Ok(store) => Ok(store),
        // A database file without a store in it.
        Err(OpenError::NoStore { .. }) => Err(no_store().into()),
        Err(error) => Err(error.into()),
    }
}

/// Closes the store, then returns the command's own result: a write is
/// reported done only once the store has shut down cleanly.
pub(crate) async fn finish<T, E>(store: Store, result: Result<T, E>) -> anyhow::Result<T>
where
    E: Into<anyhow::Error>,
{
    match result {
        Ok(value) => {
            close(store).await?;
            Ok(value)
        }
        Err(error) => {
            // The command's error is the one to report; a close failure
            // after it is only logged.
            if let Err(close_error) = store.close().await {
                tracing::warn!("closing the store after an error failed: {close_error}");
            }
            Err(error.into())
        }
    }
}

pub(crate) async fn close(store: Store) -> anyhow::Result<()> {
    store
        .close()
        .await
        .context("cannot close the store cleanly")
}

/// Undoes what a failed `init` (or `invite accept`) left behind: the
/// engine creates the database file before it makes the device key, and
/// an empty database would be taken for a store by the next `Store::open`,
/// which would then create one silently. Best effort: the original error
/// is what matters.
pub(crate) fn remove_failed_init(dir: &Path, db_file: &Path, dir_existed: bool) {
    if let Err(error) = std::fs::remove_file(db_file)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(
            "cannot remove {} after a failed init: {error}",
            db_file.display()
        );
    }
    if !dir_existed {
        // Removes the directory only if it is empty.
        let _ = std::fs::remove_dir(dir);
    }
}
