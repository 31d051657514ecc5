//! A device's disk: the database in memory, and power loss that keeps
//! exactly what was fsynced.
//!
//! [`SimDisk`] hands each open store a [`DiskHandle`] (a storage
//! [`Backend`]). Writes since the last `sync_data` are remembered as an undo
//! log; [`SimDisk::power_loss`] rolls them back, so the next open sees the
//! disk as the last fsync left it — what a machine losing power sees,
//! without torn sectors. The disk also knows whether a database still has
//! it open, so that a "crashed" store's actors are gone before the device
//! boots again (two databases on one disk would corrupt it, which is no
//! fault of the product).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use persist::{Backend, MemoryBackend};

/// One device's disk. Cheap to clone; clones share it.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    bytes: MemoryBackend,
    state: Arc<Mutex<DiskState>>,
}

#[derive(Debug, Default)]
struct DiskState {
    /// Handles alive (held by an open database).
    open: usize,
    /// Undo entries for writes since the last fsync, oldest first.
    undo: Vec<Undo>,
    /// Writes rolled back by power losses so far.
    lost_writes: u64,
}

#[derive(Debug)]
enum Undo {
    Write { offset: u64, old: Vec<u8> },
    SetLen { len: u64, tail: Vec<u8> },
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A backend for one open of the store.
    pub fn handle(&self) -> Box<dyn Backend> {
        self.lock().open += 1;
        Box::new(DiskHandle { disk: self.clone() })
    }

    /// Whether a database still holds this disk.
    pub fn in_use(&self) -> bool {
        self.lock().open > 0
    }

    /// Rolls back every write since the last fsync; returns how many.
    /// Only when no database holds the disk.
    pub fn power_loss(&self) -> usize {
        let mut state = self.lock();
        assert_eq!(state.open, 0, "power loss while a database is open");
        let undo = std::mem::take(&mut state.undo);
        let n = undo.len();
        state.lost_writes += n as u64;
        for entry in undo.into_iter().rev() {
            // Each entry restores bytes that were in range when it was made.
            let restored = match entry {
                Undo::Write { offset, old } => self.bytes.write(offset, &old),
                Undo::SetLen { len, tail } => self
                    .bytes
                    .set_len(len)
                    .and_then(|()| self.bytes.write(len - tail.len() as u64, &tail)),
            };
            assert!(restored.is_ok(), "undo stays within the disk: {restored:?}");
        }
        n
    }

    /// The disk's bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.snapshot()
    }
}

/// What an open database writes through.
#[derive(Debug)]
struct DiskHandle {
    disk: SimDisk,
}

impl Drop for DiskHandle {
    fn drop(&mut self) {
        self.disk.lock().open -= 1;
    }
}

impl Backend for DiskHandle {
    fn len(&self) -> io::Result<u64> {
        self.disk.bytes.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.disk.bytes.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.disk.lock();
        let old_len = self.disk.bytes.len()?;
        // Shrinking loses a tail that undo must restore; growing adds
        // zeros that undo cuts off again.
        let tail = if len < old_len {
            let mut tail = vec![0u8; (old_len - len) as usize];
            self.disk.bytes.read(len, &mut tail)?;
            tail
        } else {
            Vec::new()
        };
        self.disk.bytes.set_len(len)?;
        state.undo.push(Undo::SetLen { len: old_len, tail });
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.disk.lock().undo.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.disk.lock();
        let mut old = vec![0u8; data.len()];
        self.disk.bytes.read(offset, &mut old)?;
        self.disk.bytes.write(offset, data)?;
        state.undo.push(Undo::Write { offset, old });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_loss_keeps_exactly_what_was_synced() {
        let disk = SimDisk::new();
        {
            let h = disk.handle();
            h.set_len(8).unwrap();
            h.write(0, b"abcdefgh").unwrap();
            h.sync_data().unwrap();
            h.write(2, b"XY").unwrap();
            h.set_len(4).unwrap();
            h.set_len(12).unwrap();
            h.write(10, b"zz").unwrap();
            assert!(disk.in_use());
        }
        assert!(!disk.in_use());
        assert_eq!(disk.power_loss(), 4);
        assert_eq!(disk.snapshot(), b"abcdefgh");
    }
}
