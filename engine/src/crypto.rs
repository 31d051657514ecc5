//! Key lifecycle: export, rotation, purge.

use persist_actors::key_manager::{self, KeyManagerMsg};
use persist_actors::rotator::RotationProgress;
use ractor::rpc::CallResult;
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::error::KeyError;
use crate::store::{RotationStatus, Store};

/// Key operations of a store, from [`Store::crypto`].
pub struct Crypto<'s> {
    pub(crate) store: &'s Store,
}

/// A key export and, if Persist generated it, its passphrase.
pub struct KeyExport {
    /// The export text (`persist-key-v1:…`); safe to store or send, useless
    /// without the passphrase.
    pub export: String,
    /// The generated passphrase (125 bits, grouped), or `None` if the
    /// caller supplied one. Show it once; it cannot be recovered.
    pub passphrase: Option<Passphrase>,
}

/// A secret passphrase: zeroized on drop, never printed by `Debug`.
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// The passphrase text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// A running rotation, from [`Crypto::rotate_key`].
pub struct Rotation {
    epoch: u32,
    progress: watch::Receiver<RotationProgress>,
}

impl Rotation {
    /// The new current epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// How far the background re-encryption has come.
    pub fn progress(&self) -> RotationStatus {
        RotationStatus::from(*self.progress.borrow())
    }

    /// Waits until no record is left under an older epoch and the old
    /// epochs are retired.
    pub async fn wait(mut self) -> Result<RotationStatus, KeyError> {
        let done = self
            .progress
            .wait_for(|p| !p.active)
            .await
            .map_err(|_| KeyError::Closed)?;
        Ok(RotationStatus::from(*done))
    }
}

impl Crypto<'_> {
    /// Exports the store's keys wrapped under a generated passphrase,
    /// returned beside the export.
    pub async fn export_key(&self) -> Result<KeyExport, KeyError> {
        self.export(None, false).await
    }

    /// Exports the store's keys wrapped under `passphrase`.
    pub async fn export_key_with(&self, passphrase: &str) -> Result<KeyExport, KeyError> {
        self.export(Some(Zeroizing::new(passphrase.to_owned())), false)
            .await
    }

    /// Starts a new key epoch. Returns as soon as new writes use it; the
    /// records under older epochs are re-encrypted in the background (see
    /// [`Rotation::progress`] and [`Rotation::wait`]). Rotating again
    /// while one runs moves to the next epoch and the same pass finishes
    /// both.
    pub async fn rotate_key(&self) -> Result<Rotation, KeyError> {
        if self.store.is_read_only() {
            return Err(KeyError::ReadOnly);
        }
        let epoch = self.call(KeyManagerMsg::Rotate).await?;
        Ok(Rotation {
            epoch: epoch.0,
            progress: self.store.rotation_progress(),
        })
    }

    /// Deletes the keys of retired epochs (those no record uses). Records
    /// received later under a purged epoch cannot be read. Returns the
    /// epochs purged.
    pub async fn purge_retired_keys(&self) -> Result<Vec<u32>, KeyError> {
        if self.store.is_read_only() {
            return Err(KeyError::ReadOnly);
        }
        let purged = self.call(KeyManagerMsg::PurgeRetired).await?;
        Ok(purged.into_iter().map(|e| e.0).collect())
    }

    /// Operations that weaken security.
    pub fn dangerous(&self) -> DangerousCrypto<'_> {
        DangerousCrypto { crypto: self }
    }

    async fn export(
        &self,
        passphrase: Option<Zeroizing<String>>,
        raw: bool,
    ) -> Result<KeyExport, KeyError> {
        let km = self.store.key_manager().ok_or(KeyError::Closed)?;
        let params = self.store.export_kdf();
        let outcome = km
            .call(
                |reply| KeyManagerMsg::Export {
                    passphrase,
                    params,
                    raw,
                    reply,
                },
                None,
            )
            .await
            .map_err(|_| KeyError::Closed)?;
        match outcome {
            CallResult::Success(Ok(e)) => Ok(KeyExport {
                export: e.text,
                passphrase: e.generated_passphrase.map(Passphrase),
            }),
            CallResult::Success(Err(e)) => Err(map_key_error(e)),
            _ => Err(KeyError::Closed),
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        msg: impl FnOnce(ractor::RpcReplyPort<Result<T, key_manager::KeyError>>) -> KeyManagerMsg,
    ) -> Result<T, KeyError> {
        let km = self.store.key_manager().ok_or(KeyError::Closed)?;
        match km.call(msg, None).await.map_err(|_| KeyError::Closed)? {
            CallResult::Success(r) => r.map_err(map_key_error),
            _ => Err(KeyError::Closed),
        }
    }
}

/// Key operations that weaken security, from [`Crypto::dangerous`].
pub struct DangerousCrypto<'c> {
    crypto: &'c Crypto<'c>,
}

impl DangerousCrypto<'_> {
    /// Exports the store's keys unwrapped (`persist-key-raw-v1:…`): whoever
    /// reads the text holds the store's keys.
    pub async fn export_raw(&self) -> Result<String, KeyError> {
        Ok(self.crypto.export(None, true).await?.export)
    }
}

fn map_key_error(e: key_manager::KeyError) -> KeyError {
    match e {
        key_manager::KeyError::NotEncrypted => KeyError::NotEncrypted,
        other => KeyError::Failed(other.to_string()),
    }
}
