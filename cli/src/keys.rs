//! The key commands (`key export`, `key rotate`, `key purge-retired`) and
//! the reading of key exports and passphrases for them and for
//! `init --import`.
//!
//! A passphrase is secret: it is held in memory that is wiped on drop,
//! never logged, and printed only once, by `key export` when Persist
//! generated it (on stderr, so that stdout can be piped to a file).

use std::fmt::Write as _;
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use persist::{Rotation, Status, Store};
use zeroize::Zeroizing;

use crate::commands::{Access, Target, close, finish, open_existing};
use crate::failure::CliError;

/// Most bytes read from a key export file. An export is a few hundred
/// bytes per key epoch; anything far larger is not one.
const EXPORT_FILE_BYTES_MAX: u64 = 1 << 20;

/// Most bytes read as a passphrase (from a file or stdin).
const PASSPHRASE_BYTES_MAX: u64 = 4096;

/// How often `key rotate --wait` looks at the rotation's progress.
const PROGRESS_POLL: Duration = Duration::from_millis(100);

/// How many polls (3 s) the re-encryption may make no progress before the
/// records left are taken for ones it cannot reseal (damaged). Counted in
/// polls: the CLI reads no clock.
const SETTLE_STALL_POLLS: u32 = 30;

/// `persist key export [--out FILE] [--passphrase-file F]`.
pub(crate) async fn export(
    target: Target,
    out: Option<&Path>,
    passphrase_file: Option<&Path>,
) -> anyhow::Result<String> {
    // Checked before the store is opened and the (slow) export is made;
    // the file is created with `create_new` below all the same.
    if let Some(path) = out
        && std::fs::symlink_metadata(path).is_ok()
    {
        return Err(CliError::OutputExists {
            path: path.to_owned(),
        }
        .into());
    }
    let passphrase = passphrase_file.map(read_passphrase_file).transpose()?;
    let store = open_existing(&target, Access::Read).await?;
    let crypto = store.crypto();
    let result = match &passphrase {
        Some(passphrase) => crypto.export_key_with(passphrase).await,
        None => crypto.export_key().await,
    };
    let export = finish(store, result).await?;
    let text = format!("{}\n", export.export);
    let mut stdout_text = String::new();
    match out {
        Some(path) => {
            write_new_private_file(path, text.as_bytes())?;
            let _ = writeln!(stdout_text, "key export written to {}", path.display());
        }
        // Written here rather than returned: the passphrase below must only
        // be shown once the export it opens has been delivered.
        None => write_stdout(text.as_bytes())?,
    }
    if let Some(generated) = &export.passphrase
        && let Err(error) = show_generated_passphrase(generated.expose())
    {
        // An export nobody can open is no backup: take it back.
        if let Some(path) = out {
            let _ = std::fs::remove_file(path);
        }
        return Err(error);
    }
    Ok(stdout_text)
}

/// Prints a passphrase Persist generated: once, on stderr.
fn show_generated_passphrase(passphrase: &str) -> anyhow::Result<()> {
    let mut stderr = std::io::stderr().lock();
    writeln!(
        stderr,
        "The key export is protected by this passphrase:\n\
         \n    {passphrase}\n\n\
         Write this down: it is the only way to open the export. It is not \
         stored anywhere, and will not be shown again."
    )
    .and_then(|()| stderr.flush())
    .map_err(|source| CliError::ShowPassphrase { source }.into())
}

/// `persist key rotate [--wait]`.
pub(crate) async fn rotate(target: Target, wait: bool) -> anyhow::Result<String> {
    let store = open_existing(&target, Access::Write).await?;
    let rotation = match store.crypto().rotate_key().await {
        Ok(rotation) => rotation,
        Err(error) => return finish(store, Err(error)).await,
    };
    let epoch = rotation.epoch();
    if !wait {
        // Closing stops the re-encryption between two durable slices; the
        // rotation itself is durable, and the next read-write open resumes
        // it from where it stopped.
        close(store).await?;
        return Ok(format!(
            "rotation to epoch {epoch} started; re-encryption continues the next time the \
             store is opened read-write (`persist put`, `rm` or a `key` command), or pass \
             --wait to re-encrypt every record before exiting\n"
        ));
    }
    let result = wait_for_rotation(&store, rotation).await;
    let (resealed, status) = finish(store, result).await?;
    let left = epochs_with_records(&status, |state| state != "current" && state != "purged");
    if !left.is_empty() {
        return Err(CliError::RotationIncomplete {
            epoch,
            remaining: left.iter().map(|(_, n)| n).sum(),
            epochs: list(left.iter().map(|(e, _)| *e)),
        }
        .into());
    }
    let mut out = format!("rotated to epoch {epoch}: {resealed} records resealed");
    let retired = epochs_in(&status, "retired");
    if retired.is_empty() {
        out.push_str("; no epoch to retire\n");
    } else {
        let _ = writeln!(
            out,
            "; retired epoch{} {} (`persist key purge-retired` deletes their keys)",
            if retired.len() == 1 { "" } else { "s" },
            list(retired)
        );
    }
    Ok(out)
}

/// Shows the re-encryption's progress until it ends; returns the records
/// resealed and the store's status at the end.
pub(crate) async fn wait_for_rotation(
    store: &Store,
    rotation: Rotation,
) -> anyhow::Result<(u64, Status)> {
    let bar = progress_bar();
    loop {
        let progress = rotation.progress();
        bar.set_length(progress.total);
        bar.set_position(progress.done);
        if !progress.active {
            break;
        }
        tokio::time::sleep(PROGRESS_POLL).await;
    }
    let done = rotation.wait().await?.done;
    // The end of the re-encryption is checked on the records themselves:
    // a pass that started before this rotation (the one every read-write
    // open runs) can report its end, and retire the epoch just rotated
    // away from, while records are still sealed under it. The pass this
    // rotation started goes on after it; follow it through.
    let status = settle(store, &bar, |status| {
        records_in(status, |state| state != "current" && state != "purged")
    })
    .await?;
    bar.finish_and_clear();
    Ok((done.max(status.rotation.done), status))
}

/// Polls the status until `pending` counts no record and no re-encryption
/// runs, or until nothing has moved for a while (records that
/// cannot be resealed: [`SETTLE_STALL_POLLS`]); returns the last status.
async fn settle(
    store: &Store,
    bar: &ProgressBar,
    pending: impl Fn(&Status) -> u64,
) -> anyhow::Result<Status> {
    let mut status = store.status().await?;
    let mut last = pending(&status);
    let mut still = 0;
    loop {
        let left = pending(&status);
        if left == 0 && !status.rotation.active {
            return Ok(status);
        }
        if status.rotation.active {
            bar.set_length(status.rotation.total);
            bar.set_position(status.rotation.done);
        }
        if left != last || status.rotation.active {
            last = left;
            still = 0;
        } else if still >= SETTLE_STALL_POLLS {
            return Ok(status);
        } else {
            still += 1;
        }
        tokio::time::sleep(PROGRESS_POLL).await;
        status = store.status().await?;
    }
}

/// The progress bar of `key rotate --wait`, on stderr; hidden where stderr
/// is not a terminal (the summary line says it all there).
fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    // The template is fixed and valid; a bar without style still works.
    if let Ok(style) = ProgressStyle::with_template(
        "re-encrypting {bar:40} {pos}/{len} records ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar
}

/// `persist key purge-retired`.
///
/// A retired epoch should seal no record; one that still does (the engine
/// can retire an epoch early when a rotation races the re-encryption pass
/// of the open) is given time to be resealed, since this open runs the
/// re-encryption. If records remain under it, nothing is purged: their
/// key would be gone with them.
pub(crate) async fn purge_retired(target: Target) -> anyhow::Result<String> {
    let store = open_existing(&target, Access::Write).await?;
    let result = purge_when_unused(&store).await;
    let purged = finish(store, result).await?;
    if purged.is_empty() {
        return Ok(String::from("no retired epochs\n"));
    }
    let mut out = String::new();
    for epoch in purged {
        let _ = writeln!(out, "purged the keys of epoch {epoch}");
    }
    Ok(out)
}

async fn purge_when_unused(store: &Store) -> anyhow::Result<Vec<u32>> {
    let retired = |status: &Status| records_in(status, |state| state == "retired");
    let mut status = store.status().await?;
    if retired(&status) > 0 {
        status = settle(store, &ProgressBar::hidden(), retired).await?;
        let used = epochs_with_records(&status, |state| state == "retired");
        if !used.is_empty() {
            return Err(CliError::RetiredKeysInUse {
                records: used.iter().map(|(_, n)| n).sum(),
                epochs: list(used.iter().map(|(e, _)| *e)),
            }
            .into());
        }
    }
    Ok(store.crypto().purge_retired_keys().await?)
}

/// Records sealed under epochs whose state `matches`.
fn records_in(status: &Status, matches: impl Fn(&str) -> bool) -> u64 {
    epochs_with_records(status, matches)
        .iter()
        .map(|(_, n)| n)
        .sum()
}

/// The epochs whose state `matches` and that seal records, with their
/// record counts.
fn epochs_with_records(status: &Status, matches: impl Fn(&str) -> bool) -> Vec<(u32, u64)> {
    status
        .epochs
        .iter()
        .filter(|e| matches(e.state) && e.records > 0)
        .map(|e| (e.epoch, e.records))
        .collect()
}

fn epochs_in(status: &Status, state: &str) -> Vec<u32> {
    status
        .epochs
        .iter()
        .filter(|e| e.state == state)
        .map(|e| e.epoch)
        .collect()
}

fn list(epochs: impl IntoIterator<Item = u32>) -> String {
    epochs
        .into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The text of a key export file.
pub(crate) fn read_export_file(path: &Path) -> anyhow::Result<String> {
    let bytes = read_capped(path, EXPORT_FILE_BYTES_MAX, "key export")?;
    // A file that is not text is not an export; the engine says so.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The passphrase in `path`: its content without one trailing newline.
pub(crate) fn read_passphrase_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let bytes = Zeroizing::new(read_capped(path, PASSPHRASE_BYTES_MAX, "passphrase")?);
    let text = std::str::from_utf8(&bytes).map_err(|_| CliError::PassphraseNotText {
        from: path.display().to_string(),
    })?;
    let passphrase = Zeroizing::new(strip_newline(text).to_owned());
    check_not_empty(passphrase, &path.display().to_string())
}

/// One line of stdin as the passphrase, with a prompt on stderr if stdin
/// is a terminal. (The terminal echoes what is typed: use
/// --passphrase-file to keep it off the screen.)
pub(crate) fn read_passphrase_stdin() -> anyhow::Result<Zeroizing<String>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("passphrase of the key export: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = Zeroizing::new(String::new());
    let mut reader = std::io::Read::take(stdin.lock(), PASSPHRASE_BYTES_MAX + 1);
    reader
        .read_line(&mut line)
        .map_err(|source| CliError::ReadInput {
            what: "passphrase",
            from: String::from("stdin"),
            source,
        })?;
    if line.len() as u64 > PASSPHRASE_BYTES_MAX {
        return Err(CliError::PassphraseTooLong {
            max: PASSPHRASE_BYTES_MAX,
        }
        .into());
    }
    let passphrase = Zeroizing::new(strip_newline(&line).to_owned());
    check_not_empty(passphrase, "stdin")
}

fn check_not_empty(passphrase: Zeroizing<String>, from: &str) -> anyhow::Result<Zeroizing<String>> {
    if passphrase.is_empty() {
        return Err(CliError::EmptyPassphrase {
            from: from.to_owned(),
        }
        .into());
    }
    Ok(passphrase)
}

/// `text` without one trailing `\n` or `\r\n`.
fn strip_newline(text: &str) -> &str {
    let text = text.strip_suffix('\n').unwrap_or(text);
    text.strip_suffix('\r').unwrap_or(text)
}

/// The bytes of `path`, refused past `max`.
pub(crate) fn read_capped(path: &Path, max: u64, what: &'static str) -> anyhow::Result<Vec<u8>> {
    let read_error = |source| CliError::ReadInput {
        what,
        from: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, max + 1), &mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > max {
        return Err(CliError::InputFileTooLarge {
            what,
            path: path.to_owned(),
            max,
        }
        .into());
    }
    Ok(bytes)
}

/// Creates `path` (mode 0600, never over an existing file) holding `bytes`.
fn write_new_private_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = match options.open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(CliError::OutputExists {
                path: path.to_owned(),
            }
            .into());
        }
        Err(source) => {
            return Err(CliError::WriteOutput {
                path: path.to_owned(),
                source,
            }
            .into());
        }
    };
    if let Err(source) = file.write_all(bytes).and_then(|()| file.sync_all()) {
        drop(file);
        // A partial export is worse than none: it would fail as damaged.
        let _ = std::fs::remove_file(path);
        return Err(CliError::WriteOutput {
            path: path.to_owned(),
            source,
        }
        .into());
    }
    Ok(())
}

/// Writes the export to stdout; failing to is an error, even a reader that
/// went away, since the passphrase must not be shown for an export that
/// was not delivered.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(|source| CliError::WriteStdout { source }.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_newline_is_stripped() {
        assert_eq!(strip_newline("pass\n"), "pass");
        assert_eq!(strip_newline("pass\r\n"), "pass");
        assert_eq!(strip_newline("pass\n\n"), "pass\n");
        assert_eq!(strip_newline(" pass "), " pass ");
        assert_eq!(strip_newline("pass"), "pass");
    }
}
