//! Adding a device to a store with a one-time invite, and listing the
//! store's devices: `persist invite create`, `persist invite accept`,
//! `persist device list`.
//!
//! # How a pairing runs
//!
//! The inviting device makes the invite (`invite create`) and answers it
//! through its store's relay while the store is open with sync: `invite
//! create` keeps it open until the new device has joined, and without
//! waiting (`--no-wait`) any later `persist sync --watch` or `persist
//! serve` answers it. The new device (`invite accept`) needs nothing but
//! the code: it names the relay and the pin of its certificate, which
//! become the new store's remote (`remote.json`).
//!
//! # Where the code goes
//!
//! The code holds a one-time secret: whoever has it can join the store
//! until it is used or expires. It is printed on stdout only (and, as a QR
//! code, on stderr when that is a terminal), never logged; `invite accept
//! -` reads it from stdin, which keeps it out of the process list and the
//! shell history. The copies the CLI makes are wiped when dropped.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Read as _};
use std::path::PathBuf;
use std::time::Duration;

use persist::{Device, InviteCode, Store, SyncConfig};
use persist_core::invite::Invite;
use zeroize::Zeroizing;

use crate::commands::{self, Access, Target, finish, open_existing, open_syncing};
use crate::failure::CliError;
use crate::keys;
use crate::remote::{self, AdmissionSecret, RemoteSpec, Trust};
use crate::sync::{self, Shutdown};

/// The longest an invite lasts (the engine's limit).
pub(crate) const EXPIRY_MAX: Duration = Duration::from_millis(persist_core::invite::TTL_MAX_MS);

/// The longest `invite accept` waits for the inviter: no invite outlives
/// this, so a longer wait could only end in "expired".
pub(crate) const ACCEPT_TIMEOUT_MAX: Duration = EXPIRY_MAX;

/// Most bytes of a code read from stdin: a code is at most
/// `CODE_BYTES_MAX`, plus a newline or two around it.
const STDIN_CODE_BYTES_MAX: u64 = persist_core::invite::CODE_BYTES_MAX as u64 + 16;

/// Whether `invite create` shows the code as a QR code on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Qr {
    /// When stderr is a terminal: someone is there to scan it, and a
    /// script reading stderr gets no block art.
    Auto,
    /// Always (`--qr`).
    Always,
    /// Never (`--no-qr`).
    Never,
}

/// What `invite create` does once the code is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AfterCreate {
    /// Keep the store open, answering the invite, until a device joins
    /// with it, the invite expires, or Ctrl-C.
    Wait,
    /// Return at once; a later `persist sync --watch` or `persist serve`
    /// answers it.
    Return,
}

/// What `invite create` was asked for.
pub(crate) struct CreateOptions {
    /// How long the invite lasts.
    pub(crate) expires: Duration,
    /// Whether to wait for the new device.
    pub(crate) after: AfterCreate,
    /// Whether to show a QR code.
    pub(crate) qr: Qr,
    /// JSON instead of the bare code.
    pub(crate) as_json: bool,
    /// The relay operator's admission secret file (`--admission-secret-file`).
    pub(crate) admission_file: Option<PathBuf>,
}

/// `persist invite create [--expires D] [--no-wait] [--json] [--qr|--no-qr]
/// [--admission-secret-file F]`.
///
/// Prints the code (or `{"code","id","expires_ms"}`) on stdout as soon as
/// it is made, then, unless told not to, waits on stderr for the new
/// device. Ctrl-C stops the wait, not the invite.
///
/// On a relay that admits only its operator's devices, the pairing runs
/// through a store of its own (named by the invite), which only a device
/// holding the operator's secret may make there: hence the secret file, as
/// for `init` and `sync`. It is read for this command and never kept.
pub(crate) async fn create(target: Target, options: CreateOptions) -> anyhow::Result<String> {
    let CreateOptions {
        expires,
        after,
        qr,
        as_json,
        admission_file,
    } = options;
    target.require_store()?;
    // The invite names the relay, and the engine answers it through the
    // store's sync session: both need the remote.
    let spec = remote::require(&target.dir)?;
    let admission = admission_file
        .as_deref()
        .map(AdmissionSecret::read)
        .transpose()?;
    let remote = spec.remote(admission.as_ref())?;
    drop(admission);
    let mut shutdown = match after {
        AfterCreate::Wait => Some(Shutdown::listen()?),
        AfterCreate::Return => None,
    };
    let store = open_syncing(&target, remote).await?;
    let invite = match store.crypto().create_invite_for(expires).await {
        Ok(invite) => invite,
        Err(error) => return finish(store, Err(error)).await,
    };
    let printed = sync::print_line(&code_line(&invite, as_json)).and_then(|()| {
        if show_qr(qr) {
            print_qr(invite.code())
        } else {
            Ok(())
        }
    });
    let result = match (printed, shutdown.as_mut()) {
        (Err(error), _) => Err(error),
        (Ok(()), None) => Ok(()),
        (Ok(()), Some(shutdown)) => wait_for_device(&store, &invite, shutdown).await,
    };
    finish(store, result).await?;
    Ok(String::new())
}

/// `persist invite accept [--name N] [--timeout D] [--ca FILE] CODE`: joins
/// the store of the invite from an empty directory (or completes a join
/// there that failed after it stored the store's keys), keeps the code's
/// relay as the store's remote, and prints the new ids like `persist init`.
pub(crate) async fn accept(
    target: Target,
    name: &str,
    code: Zeroizing<String>,
    timeout: Duration,
    ca: Option<PathBuf>,
) -> anyhow::Result<String> {
    target.check_is_dir()?;
    // A directory that holds a store is left to the engine: it resumes a
    // join of the invite's store that stored its keys and then failed to
    // open (see `Config::invite`), and refuses anything else.
    let had_db = target.has_db();
    let code = if code.as_str() == "-" {
        read_code_stdin()?
    } else {
        Zeroizing::new(code.trim().to_owned())
    };
    // Read here too, before anything is touched: the CLI keeps the relay
    // and its pin as the remote. The engine reads it again and checks its
    // expiry with its own clock.
    let spec = remote_of(&code, ca)?;
    let remote = spec.remote(None)?;
    if !had_db {
        // With a store there it does not pair (it resumes, or refuses).
        eprintln!(
            "waiting for the inviting device to answer through {} (it must be online with sync)",
            spec.url
        );
    }
    let dir_existed = target.dir.exists();
    let config = target
        .config()
        .name(name)
        .invite(&code)
        .invite_timeout(timeout)
        .sync(SyncConfig::new(remote));
    drop(code);
    let store = match Store::open(config).await {
        Ok(store) => store,
        Err(persist::OpenError::InviteIntoExistingStore { .. }) => {
            return Err(CliError::StoreExists { dir: target.dir }.into());
        }
        Err(error) => {
            // The engine removes a database it made unless the join stored
            // its keys there, which a retry then resumes (removing it would
            // make the retry pair again, and leave the inviter a member
            // that never comes). The directory, if this command made it
            // and nothing is in it, goes too.
            if !had_db && !target.has_db() && !dir_existed {
                let _ = std::fs::remove_dir(&target.dir);
            }
            return Err(error.into());
        }
    };
    let info = store.info().clone();
    let saved = remote::save(&target.dir, &spec).map_err(|error| {
        error.context(format!(
            "this device joined the store, but its remote could not be kept: run \
             `persist remote set --store {} {}`",
            target.dir.display(),
            remote_args(&spec)
        ))
    });
    finish(store, saved).await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "joined store {} at {} with the invite",
        info.store_id,
        info.path.display()
    );
    commands::ids_text(&mut out, &info);
    let _ = writeln!(out, "remote:     {}", spec.describe());
    let _ = writeln!(
        out,
        "records:    arrive by sync: run `persist sync --store {}`",
        target.dir.display()
    );
    Ok(out)
}

/// `persist device list [--json]`: the store's devices, oldest first, as
/// `ID<TAB>NAME<TAB>added by ID at TIME[<TAB>(this device)]` lines.
pub(crate) async fn list(target: Target, as_json: bool) -> anyhow::Result<String> {
    let store = open_existing(&target, Access::Read).await?;
    let result = store.crypto().devices().await;
    let mut devices = finish(store, result).await?;
    devices.sort_by_key(|d| (d.added_at_ms, d.id));
    if as_json {
        let list: Vec<_> = devices.iter().map(device_json).collect();
        return Ok(format!("{}\n", serde_json::Value::Array(list)));
    }
    let mut out = String::new();
    for device in &devices {
        let _ = write!(
            out,
            "{}\t{}\tadded by {} at {}",
            device.id,
            printable(&device.name),
            device.added_by,
            utc_time(device.added_at_ms)
        );
        if device.this_device {
            out.push_str("\t(this device)");
        }
        if device.revoked {
            out.push_str("\t(revoked)");
        }
        out.push('\n');
    }
    Ok(out)
}

/// `persist device revoke ID [--wait]`: revokes a member; with `--wait`,
/// re-encrypts every record under the new epoch before exiting and, when
/// the store has a remote, syncs and sees the relay switch through as far
/// as it can go now ([`relay_after_revocation`]).
pub(crate) async fn revoke(
    target: Target,
    device: persist::DeviceId,
    wait: bool,
) -> anyhow::Result<String> {
    let remote = match remote::load(&target.dir)? {
        Some(spec) if wait => Some(spec.remote(None)?),
        _ => None,
    };
    let store = match remote {
        Some(remote) => open_syncing(&target, remote).await?,
        None => open_existing(&target, Access::Write).await?,
    };
    let revocation = match store.crypto().revoke_device(device).await {
        Ok(r) => r,
        Err(error) => return finish(store, Err(error)).await,
    };
    let epoch = revocation.epoch();
    let head = format!("revoked device {device}: new key epoch {epoch}, which it never receives");
    if !wait {
        commands::close(store).await?;
        return Ok(format!(
            "{head}; the other members get it, and learn of the revocation, the next time \
             this store syncs (`persist sync`)\nre-encryption continues the next time the \
             store is opened read-write, or pass --wait\n"
        ));
    }
    let resealed = match keys::wait_for_rotation(&store, revocation).await {
        Ok((resealed, _)) => resealed,
        Err(error) => return finish(store, Err(error)).await,
    };
    let relay = match store.sync_status() {
        Some(_) => relay_after_revocation(&store).await,
        None => "this store has no remote: the other members get the new key, and the relay \
                 switches to a new access token, once it syncs (`persist remote set`, \
                 `persist sync`)"
            .to_owned(),
    };
    finish(store, Ok::<_, anyhow::Error>(())).await?;
    Ok(format!("{head}\n{resealed} records resealed\n{relay}\n"))
}

/// After a revocation's re-encryption: syncs, which pushes the resealed
/// records and has the key courier run a round (the key parcels go out,
/// and the relay is switched to the revocation's access token unless
/// members must acknowledge the new key first). Says where that stands; a
/// remote that cannot be reached is said, not an error: the revocation
/// itself is done, and the next `persist sync` carries on.
async fn relay_after_revocation(store: &Store) -> String {
    if let Err(error) = store.sync_now().await {
        return format!(
            "could not sync yet ({error}): the members get the new key, and the relay switches \
             to a new access token, after the next `persist sync`"
        );
    }
    let switch = match store.status().await {
        Ok(status) => status.relay_switch,
        Err(error) => return format!("cannot read the store's status: {error}"),
    };
    match switch {
        None => "switched the relay to a new access token: it refuses the revoked device from \
                 now on"
            .to_owned(),
        Some(switch) if !switch.waiting_for.is_empty() => {
            let by = switch
                .due_ms
                .map(|ms| format!(", or at {} whether they did or not", utc_time(ms)))
                .unwrap_or_default();
            format!(
                "the relay switches to a new access token, which the revoked device never \
                 receives, once these members have synced and acknowledged the new key: \
                 {}{by}; this device must sync after that (`persist sync`, or keep `persist \
                 sync --watch` running)",
                switch.waiting_for.join(", ")
            )
        }
        Some(_) => {
            let why = store
                .sync_status()
                .and_then(|s| s.last_error)
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            format!(
                "the relay has not switched to the new access token yet{why}; the next \
                 `persist sync` tries again"
            )
        }
    }
}

/// Parses `--expires`: a duration of at most [`EXPIRY_MAX`].
pub(crate) fn parse_expiry(text: &str) -> Result<Duration, String> {
    parse_bounded(text, EXPIRY_MAX, "an invite lasts")
}

/// Parses `--timeout`: a duration of at most [`ACCEPT_TIMEOUT_MAX`].
pub(crate) fn parse_timeout(text: &str) -> Result<Duration, String> {
    parse_bounded(text, ACCEPT_TIMEOUT_MAX, "the wait lasts")
}

/// The code as `invite create` prints it on stdout.
fn code_line(invite: &InviteCode, as_json: bool) -> Zeroizing<String> {
    let code = invite.code();
    // Room for the whole line, so that no partial copy is left behind by
    // a reallocation.
    let mut line = Zeroizing::new(String::with_capacity(code.len() + 128));
    if as_json {
        // A code is a prefix and base64url: nothing in it needs escaping.
        debug_assert!(
            code.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_:=".contains(&b)),
            "an invite code is printable ASCII without quotes or backslashes"
        );
        let _ = writeln!(
            line,
            r#"{{"code":"{code}","id":"{}","expires_ms":{}}}"#,
            invite.id(),
            invite.expires_ms()
        );
    } else {
        let _ = writeln!(line, "{code}");
    }
    line
}

fn show_qr(qr: Qr) -> bool {
    match qr {
        Qr::Always => true,
        Qr::Never => false,
        Qr::Auto => std::io::stderr().is_terminal(),
    }
}

/// The code as a QR code on stderr, for a phone's camera.
fn print_qr(code: &str) -> anyhow::Result<()> {
    use qrcode::render::unicode::Dense1x2;
    use std::io::Write as _;

    let qr = qrcode::QrCode::new(code.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot draw the invite as a QR code: {e}"))?;
    // Swapped colours: most terminals draw light text on a dark
    // background, and a scanner wants dark modules on a light field.
    let art = Zeroizing::new(
        qr.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .build(),
    );
    let mut stderr = std::io::stderr().lock();
    writeln!(stderr, "{}", art.as_str())
        .and_then(|()| stderr.flush())
        .map_err(|e| anyhow::anyhow!("cannot show the QR code on stderr: {e}"))
}

/// Keeps the store open, so that its responder answers the invite, until a
/// device joins, the invite expires or a signal arrives. A signal ends
/// the wait only: the invite stays valid.
async fn wait_for_device(
    store: &Store,
    invite: &InviteCode,
    shutdown: &mut Shutdown,
) -> anyhow::Result<()> {
    let until = utc_time(invite.expires_ms());
    eprintln!(
        "waiting for the new device to accept the invite (Ctrl-C to stop; it stays valid until \
         {until}, answered whenever this store syncs: persist sync --watch)"
    );
    let crypto = store.crypto();
    let joined = tokio::select! {
        joined = crypto.invite_used(invite) => joined,
        () = shutdown.wait() => {
            eprintln!(
                "stopped waiting; the invite stays valid until {until}, and is answered whenever \
                 this store is open with sync (persist sync --watch, persist serve)"
            );
            return Ok(());
        }
    };
    let device = match joined {
        Ok(device) => device,
        Err(persist::KeyError::InviteExpired) => {
            return Err(CliError::InviteUnused { expired: until }.into());
        }
        Err(error) => return Err(error.into()),
    };
    eprintln!("device {device} joined");
    // The new device reads the store from the relay: this pushes what it
    // may not hold yet (this device's latest writes, and the new member
    // list for the other devices). Best effort: the next sync does it too.
    if let Err(error) = store.sync_now().await {
        tracing::warn!("the first sync after the pairing failed ({error}); run `persist sync`");
    }
    Ok(())
}

/// The remote the new store keeps: the code's relay, trusted by the code's
/// pin, or by `ca` when given (a relay with an operator's certificate).
fn remote_of(code: &str, ca: Option<PathBuf>) -> anyhow::Result<RemoteSpec> {
    let invite = Invite::decode(code)?;
    let url = invite.relay.clone();
    match (invite.pin, ca) {
        (_, Some(ca)) => RemoteSpec::from_args(url, Vec::new(), None, Some(ca)),
        (Some(pin), None) => Ok(RemoteSpec {
            url,
            also: Vec::new(),
            trust: Trust::Pin(pin_text(&pin)),
        }),
        (None, None) => Err(CliError::InviteNeedsCa { relay: url }.into()),
    }
}

/// `sha256:<hex>`, as `persist-relay` prints a pin.
fn pin_text(pin: &[u8; 32]) -> String {
    let mut text = String::from("sha256:");
    for byte in pin {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// `URL --pin P` or `URL --ca FILE`, for a message that gives a command.
fn remote_args(spec: &RemoteSpec) -> String {
    match &spec.trust {
        Trust::Pin(pin) => format!("{} --pin {pin}", spec.url),
        Trust::Ca(ca) => format!("{} --ca {}", spec.url, ca.display()),
    }
}

/// The code on stdin. It may be wrapped over several lines: the engine
/// ignores whitespace inside a code.
fn read_code_stdin() -> anyhow::Result<Zeroizing<String>> {
    let mut text = Zeroizing::new(String::with_capacity(STDIN_CODE_BYTES_MAX as usize + 1));
    std::io::stdin()
        .take(STDIN_CODE_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .map_err(|source| CliError::ReadInput {
            what: "invite code",
            from: String::from("stdin"),
            source,
        })?;
    // Longer than any code: decoding says "damaged".
    Ok(Zeroizing::new(text.trim().to_owned()))
}

fn device_json(device: &Device) -> serde_json::Value {
    serde_json::json!({
        "id": device.id.to_string(),
        "name": device.name,
        "added_by": device.added_by.to_string(),
        "added_at_ms": device.added_at_ms,
        "added_at": utc_time(device.added_at_ms),
        "this_device": device.this_device,
        "revoked": device.revoked,
    })
}

/// A device name as one field of a line: names come from other devices,
/// so control characters (a tab, a newline, a terminal escape) are shown
/// escaped rather than obeyed.
fn printable(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `NUMBER UNIT` with a unit of s, m, h or d (`30m`, `24h`, `7d`), from
/// one second to `max`.
fn parse_bounded(text: &str, max: Duration, what: &str) -> Result<Duration, String> {
    let usage =
        || format!("{text:?} is not a duration: write a number and s, m, h or d (30m, 24h, 7d)");
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(usage)?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| usage())?;
    let unit_secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => 24 * 60 * 60,
        _ => return Err(usage()),
    };
    let longest = || format!("{what} at most {}", short_duration(max));
    let secs = number.checked_mul(unit_secs).ok_or_else(longest)?;
    if secs == 0 {
        return Err(format!("{what} at least 1s"));
    }
    let duration = Duration::from_secs(secs);
    if duration > max {
        return Err(longest());
    }
    Ok(duration)
}

/// `30d`, `24h`, `10m` or `45s`: the largest unit that divides it.
fn short_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs >= size && secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// `YYYY-MM-DDTHH:MM:SSZ` for ms since the Unix epoch (RFC 3339, UTC): the
/// CLI reads no clock, it only shows times the engine gives it.
pub(crate) fn utc_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let of_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// The Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shifted so that eras (400-year cycles) start on 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_one_unit_and_stay_in_bounds() {
        assert_eq!(parse_expiry("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_expiry("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_expiry("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_expiry("30d"), Ok(EXPIRY_MAX));
        assert_eq!(parse_timeout("45s"), Ok(Duration::from_secs(45)));
        let too_long = parse_expiry("40d").unwrap_err();
        assert_eq!(too_long, "an invite lasts at most 30d");
        assert!(parse_expiry("721h").is_err(), "30d and an hour");
        assert!(parse_expiry("0m").unwrap_err().contains("at least"));
        assert!(
            parse_expiry("99999999999999999999d").is_err(),
            "no overflow"
        );
        for bad in ["", "24", "h", "1.5h", "-1h", "1w", "1 h", "1hh", "1h30m"] {
            let error = parse_expiry(bad).unwrap_err();
            assert!(error.contains("not a duration"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc_time(1_709_251_199_999), "2024-02-29T23:59:59Z");
        assert_eq!(utc_time(1_735_689_600_000), "2025-01-01T00:00:00Z");
        assert_eq!(utc_time(4_102_444_800_000), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn names_cannot_break_the_line_format() {
        assert_eq!(printable("phone"), "phone");
        assert_eq!(printable("a\tb\nc\u{1b}[2J"), "a\\tb\\nc\\u{1b}[2J");
        assert_eq!(printable("Léa's ☎"), "Léa's ☎");
    }

    #[test]
    fn pins_print_like_the_relay_prints_them() {
        let pin = [0xab; 32];
        assert_eq!(pin_text(&pin), format!("sha256:{}", "ab".repeat(32)));
    }
}
