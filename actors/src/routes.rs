//! Current addresses of a store's actors.
//!
//! The supervisor replaces an actor's address when it restarts that
//! actor; everyone else (the engine, the Sealer forwarding to the
//! StorageWriter) looks the address up at each send, so a restart is
//! invisible to them except for the requests that were in flight.

use std::sync::{Arc, RwLock};

use ractor::ActorRef;

use crate::key_manager::KeyManagerMsg;
use crate::peer_session::PeerMsg;
use crate::rotator::RotatorMsg;
use crate::sealer::SealerMsg;
use crate::storage_writer::WriterMsg;

/// Shared, swappable actor addresses.
#[derive(Clone, Default)]
pub struct Routes(Arc<RwLock<Slots>>);

#[derive(Default)]
struct Slots {
    key_manager: Option<ActorRef<KeyManagerMsg>>,
    sealer: Option<ActorRef<SealerMsg>>,
    writer: Option<ActorRef<WriterMsg>>,
    rotator: Option<ActorRef<RotatorMsg>>,
    peer_session: Option<ActorRef<PeerMsg>>,
}

impl Routes {
    /// The KeyManager, if running.
    pub fn key_manager(&self) -> Option<ActorRef<KeyManagerMsg>> {
        self.read(|s| s.key_manager.clone())
    }

    /// The Sealer, if running.
    pub fn sealer(&self) -> Option<ActorRef<SealerMsg>> {
        self.read(|s| s.sealer.clone())
    }

    /// The StorageWriter, if running.
    pub fn writer(&self) -> Option<ActorRef<WriterMsg>> {
        self.read(|s| s.writer.clone())
    }

    /// The Rotator, if running.
    pub fn rotator(&self) -> Option<ActorRef<RotatorMsg>> {
        self.read(|s| s.rotator.clone())
    }

    /// The PeerSession, if the store syncs and it is running.
    pub fn peer_session(&self) -> Option<ActorRef<PeerMsg>> {
        self.read(|s| s.peer_session.clone())
    }

    pub(crate) fn set_peer_session(&self, r: Option<ActorRef<PeerMsg>>) {
        self.write(|s| s.peer_session = r);
    }

    pub(crate) fn set_rotator(&self, r: Option<ActorRef<RotatorMsg>>) {
        self.write(|s| s.rotator = r);
    }

    pub(crate) fn set_key_manager(&self, r: Option<ActorRef<KeyManagerMsg>>) {
        self.write(|s| s.key_manager = r);
    }

    pub(crate) fn set_sealer(&self, r: Option<ActorRef<SealerMsg>>) {
        self.write(|s| s.sealer = r);
    }

    pub(crate) fn set_writer(&self, r: Option<ActorRef<WriterMsg>>) {
        self.write(|s| s.writer = r);
    }

    fn read<T>(&self, f: impl FnOnce(&Slots) -> T) -> T {
        // A poisoned lock only means a writer panicked mid-assignment of an
        // Option; the slots are still valid values.
        let guard = self.0.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    fn write(&self, f: impl FnOnce(&mut Slots)) {
        let mut guard = self.0.write().unwrap_or_else(|p| p.into_inner());
        f(&mut guard);
    }
}
