//! The pure core of Persist: everything that decides, nothing that does IO.
//!
//! This crate holds the identifiers ([`ids`]), the hybrid logical clock
//! ([`hlc`]), the last-write-wins rule ([`lww`]), the secret key types
//! ([`keys`]), the sealed record and its padding ([`record`], [`padding`]),
//! envelope v1 ([`envelope`]), the keyring sealed under the device key
//! ([`keyring`]) and the sync wire protocol ([`protocol`]).
//!
//! It never reads a clock, an OS random source, a file or a socket: time and
//! randomness come in as arguments through the [`env`] traits, so the same
//! inputs always give the same bytes. That is what lets the simulation
//! suites replay a run from one seed.
//!
//! ```
//! use persist_core::env::{Entropy, SeededEntropy};
//! use persist_core::envelope::{self, Envelope, Flags, SealContext};
//! use persist_core::hlc::Hlc;
//! use persist_core::keyring::Keyring;
//! use persist_core::keys::DeviceIdentity;
//! use persist_core::record::Record;
//!
//! let entropy = SeededEntropy::from_u64(7);
//! let mut rng = entropy.stream("example");
//! let device = DeviceIdentity::generate(&mut rng);
//! let ring = Keyring::create(device, "laptop", Hlc::default(), &mut rng);
//!
//! let record = Record {
//!     path: "notes/1".into(),
//!     value: b"hello".to_vec(),
//!     origin: ring.device_id(),
//!     hlc: Hlc { ms: 1, counter: 0 },
//! };
//! let locator = ring.index_key.locator(&ring.store_id, &record.path);
//! let ctx = SealContext {
//!     store_id: ring.store_id,
//!     epoch: ring.current,
//!     data_key: ring.current_key(),
//!     signing_key: ring.device.signing_key(),
//!     signer: ring.device_id(),
//! };
//! let bytes = envelope::seal(&ctx, &locator, &record, Flags::default(), 1, &mut rng)?;
//! let parsed = Envelope::parse(&bytes)?;
//! let opened = envelope::open(&parsed, &ring.store_id, &locator, ring.current_key(), |p| {
//!     ring.index_key.locator(&ring.store_id, p)
//! })?;
//! assert_eq!(opened, record);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod env;
pub mod envelope;
pub mod export;
pub mod hlc;
pub mod ids;
pub mod invite;
pub mod keyring;
pub mod keys;
pub mod keywrap;
pub mod lww;
pub mod membership;
pub mod padding;
pub mod protocol;
pub mod record;

pub use ids::{DeviceId, Epoch, IdParseError, InviteId, Locator, StoreId};
