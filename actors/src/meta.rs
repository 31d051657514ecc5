//! Keys of the local database's meta table, shared by the engine's
//! bootstrap and the actors.

/// The store id (16 bytes, clear).
pub const STORE_ID: &str = "store_id";
/// This device's id (16 bytes, clear).
pub const DEVICE_ID: &str = "device_id";
/// `[1]` if records are encrypted, `[0]` if not.
pub const ENCRYPTED: &str = "encrypted";
/// The keyring sealed under the KEK.
pub const KEYRING: &str = "keyring";
/// The epoch keys other members acknowledged to this device: (epoch u32
/// BE ‖ device id) pairs, clear (device ids and epoch numbers are in every
/// envelope header anyway).
pub const EPOCH_ACKS: &str = "epoch_acks";
/// This device's name (UTF-8).
pub const NAME: &str = "name";
/// Where a join by invite paired: the relay address (UTF-8), then the
/// certificate pin's 32 bytes if the invite had one. Resuming a join that
/// did not finish takes only an invite naming the same.
pub const JOINED_VIA: &str = "joined_via";
/// The Sealer's HLC high-water mark.
pub const HLC: &str = "hlc";
/// The Sealer's last sequence number.
pub const SEQ: &str = "seq";
/// When each epoch became current on this device: (epoch u32 BE, ms u64
/// BE) pairs, for the grace period of old epochs' retirement.
pub const EPOCH_SINCE: &str = "epoch_since";
/// How many of the keyring's revocations the records were swept for
/// (u64 BE); see `forget`.
pub const REVOCATIONS_SWEPT: &str = "revocations_swept";
/// The Rotator's cursor: the last locator resealed in the current pass.
pub const ROTATION_CURSOR: &str = "rotation_cursor";
/// The remote the sync cursors belong to (UTF-8, as the connector names it).
pub const SYNC_REMOTE: &str = "sync_remote";
/// The last local change sequence number the remote acknowledged (u64 BE).
pub const SYNC_PUSH_CURSOR: &str = "sync_push_cursor";
/// The remote log sequence number applied up to (u64 BE).
pub const SYNC_PULL_CURSOR: &str = "sync_pull_cursor";
