//! The byte store under redb, injectable so tests and simulations can hold a
//! database in memory or drop unsynced writes to simulate power loss.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A pluggable byte store under the local database.
///
/// Mirrors redb's `StorageBackend` with `std::io::Error`, so redb types do not
/// leak out of this crate. Implementations need no locking: a database opened
/// on a [`Backend`] assumes it is the only writer of those bytes.
// `len` is a storage length, not a collection size: an `is_empty` would only
// invite confusion with "the database is empty".
#[allow(clippy::len_without_is_empty)]
pub trait Backend: fmt::Debug + Send + Sync + 'static {
    /// The current length of the storage, in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Fills `out` with the bytes at `offset`; reading past the end is an error.
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()>;
    /// Grows (new bytes are zero) or shrinks the storage to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every write so far durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Writes `data` at `offset`, within the current length.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
}

/// A [`Backend`] in memory.
///
/// Clones share the same bytes, so a test can drop a database and "reopen"
/// the same memory, or inspect the raw bytes with [`MemoryBackend::snapshot`].
#[derive(Clone, Default)]
pub struct MemoryBackend {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl MemoryBackend {
    /// A backend holding `bytes`, e.g. a copy of a database file, or garbage.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: Arc::new(Mutex::new(bytes)),
        }
    }

    /// A copy of the raw bytes, e.g. to scan them for plaintext canaries.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // Every operation leaves the Vec whole, so a panic elsewhere while the
        // lock was held cannot have left it half-written.
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the bytes: a database image is large and may be shown in logs.
        f.debug_struct("MemoryBackend")
            .field("len", &self.lock().len())
            .finish()
    }
}

impl Backend for MemoryBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let bytes = self.lock();
        let range = byte_range(offset, out.len(), bytes.len())?;
        out.copy_from_slice(&bytes[range]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "length exceeds memory"))?;
        self.lock().resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut bytes = self.lock();
        let range = byte_range(offset, data.len(), bytes.len())?;
        bytes[range].copy_from_slice(data);
        Ok(())
    }
}

/// `offset..offset + len` if it lies within `total`, else `UnexpectedEof`.
fn byte_range(offset: u64, len: usize, total: usize) -> io::Result<std::ops::Range<usize>> {
    usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(len)?))
        .filter(|range| range.end <= total)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{len} bytes at offset {offset} lie past the end ({total} bytes)"),
            )
        })
}

/// Hands a [`Backend`] to redb. Shared (`Arc`) so that an open can first
/// probe the bytes read-only and then open them for writing.
#[derive(Debug, Clone)]
pub(crate) struct RedbBackend(pub(crate) Arc<dyn Backend>);

impl redb::StorageBackend for RedbBackend {
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_backend_bounds_and_sharing() {
        let a = MemoryBackend::default();
        let b = a.clone();
        a.set_len(8).unwrap();
        a.write(2, &[1, 2, 3]).unwrap();
        let mut out = [0u8; 4];
        b.read(1, &mut out).unwrap();
        assert_eq!(out, [0, 1, 2, 3]);
        assert_eq!(b.snapshot(), vec![0, 0, 1, 2, 3, 0, 0, 0]);
        let err = b.read(6, &mut out).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(a.write(u64::MAX, &[1]).is_err());
        assert!(format!("{a:?}").contains("len: 8"));
    }
}
