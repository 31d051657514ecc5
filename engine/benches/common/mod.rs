//! Helpers shared by the benches: where the databases go, and what the
//! process measures of itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the databases go: a disk on which fsync does real work.
pub(crate) fn bench_root() -> std::io::Result<PathBuf> {
    let root = match std::env::var_os("PERSIST_BENCH_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let tmp = std::env::temp_dir();
            match fs_type(&tmp).as_deref() {
                Some("tmpfs" | "ramfs") => {
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/persist-bench")
                }
                _ => tmp,
            }
        }
    };
    std::fs::create_dir_all(&root)?;
    Ok(root)
}

/// The file system type of the mount holding `path`, from /proc/mounts.
pub(crate) fn fs_type(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_dev, mount, fs) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(mount)
                .then(|| (mount.len(), fs.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs)| fs)
}

/// A field of /proc/self/status in KiB (`VmHWM`, `VmRSS`).
pub(crate) fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

pub(crate) fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.parse().ok()
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// CPU time of every thread of this process so far, from /proc/self/stat
/// (zero where it cannot be read).
pub(crate) fn process_cpu() -> Duration {
    const TICKS_PER_S: u64 = 100;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name, which may hold spaces:
    // utime and stime are fields 14 and 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 1000 / TICKS_PER_S)
}
