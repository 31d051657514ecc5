//! Key lifecycle: export, rotation, purge.

use std::time::Duration;

use persist_actors::key_manager::{self, KeyManagerMsg};
use persist_actors::rotator::RotationProgress;
use persist_core::hlc::Hlc;
use persist_core::invite;
use persist_core::keyring::RevokeError;
use persist_core::{DeviceId, InviteId};
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

/// An invite, from [`Crypto::create_invite`]. The code holds a one-time
/// secret: whoever has it can join the store until it is used or expires.
pub struct InviteCode {
    code: Zeroizing<String>,
    id: InviteId,
    expires_ms: u64,
}

impl InviteCode {
    /// The code (`persist-invite-v1:…`), to give the new device.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The invite's id (what the relay sees of it).
    pub fn id(&self) -> InviteId {
        self.id
    }

    /// When it expires, in ms since the Unix epoch.
    pub fn expires_ms(&self) -> u64 {
        self.expires_ms
    }
}

impl std::fmt::Debug for InviteCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InviteCode")
            .field("id", &self.id)
            .field("expires_ms", &self.expires_ms)
            .finish_non_exhaustive()
    }
}

/// A member device of the store, from [`Crypto::devices`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Device {
    /// Its id.
    pub id: DeviceId,
    /// Its name.
    pub name: String,
    /// The device that added it (itself for the store's creator and for
    /// devices that joined with a key export).
    pub added_by: DeviceId,
    /// When, in ms since the Unix epoch.
    pub added_at_ms: u64,
    /// Whether it is this device.
    pub this_device: bool,
    /// Whether it was revoked: it receives no new key, and what it signs
    /// after its revocation is refused.
    pub revoked: bool,
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
        // The other members get the new key through their mailboxes.
        self.store.kick_courier();
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

    /// Makes an invite for a new device, valid for 24 hours: see
    /// [`Crypto::create_invite_for`].
    pub async fn create_invite(&self) -> Result<InviteCode, KeyError> {
        self.create_invite_for(Duration::from_millis(invite::TTL_DEFAULT_MS))
            .await
    }

    /// Makes an invite for a new device, valid for `ttl` (at most 30
    /// days), and starts answering it.
    ///
    /// Give the code to the new device, which joins with
    /// [`Config::invite`](crate::Config::invite). The pairing goes through
    /// this store's relay, and this device answers it while the store is
    /// open with sync (now, or after a reopen). The code works once.
    pub async fn create_invite_for(&self, ttl: Duration) -> Result<InviteCode, KeyError> {
        if self.store.is_read_only() {
            return Err(KeyError::ReadOnly);
        }
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 || ttl_ms > invite::TTL_MAX_MS {
            return Err(KeyError::InviteLifetime {
                asked: ttl,
                max_days: invite::TTL_MAX_MS / 86_400_000,
            });
        }
        let responders = self.store.responders().ok_or(KeyError::NoRelay)?;
        let (relay, pin) = responders.relay();
        let now_ms = self.store.now_ms();
        let (new, route) = self
            .call(|reply| KeyManagerMsg::CreateInvite {
                relay: relay.to_owned(),
                pin,
                now_ms,
                expires_ms: now_ms.saturating_add(ttl_ms),
                reply,
            })
            .await?;
        responders.serve(route);
        Ok(InviteCode {
            code: new.code,
            id: new.id,
            expires_ms: new.expires_ms,
        })
    }

    /// Waits until a device joins with invite `id` (made by this store
    /// while open) and returns the new device's id; [`KeyError::Closed`]
    /// if the store closes first, [`KeyError::InviteExpired`] once the
    /// invite has expired unused.
    pub async fn invite_used(&self, invite: &InviteCode) -> Result<DeviceId, KeyError> {
        let responders = self.store.responders().ok_or(KeyError::NoRelay)?;
        let now_ms = self.store.now_ms();
        let left = Duration::from_millis(invite.expires_ms.saturating_sub(now_ms));
        match tokio::time::timeout(left, responders.joined(invite.id)).await {
            Ok(Some(device)) => Ok(device),
            Ok(None) => Err(KeyError::Closed),
            Err(_) => Err(KeyError::InviteExpired),
        }
    }

    /// The store's member devices this device knows of, itself included.
    pub async fn devices(&self) -> Result<Vec<Device>, KeyError> {
        let km = self.store.key_manager().ok_or(KeyError::Closed)?;
        let members = match km.call(KeyManagerMsg::Members, None).await {
            Ok(CallResult::Success(m)) => m,
            _ => return Err(KeyError::Closed),
        };
        let revoked = match km.call(KeyManagerMsg::Revocations, None).await {
            Ok(CallResult::Success(r)) => r,
            _ => return Err(KeyError::Closed),
        };
        let me = self.store.info().device_id;
        Ok(members
            .into_iter()
            .map(|m| Device {
                revoked: revoked.iter().any(|r| r.device_id == m.device_id),
                id: m.device_id,
                name: m.name,
                added_by: m.added_by,
                added_at_ms: m.added_at.ms,
                this_device: m.device_id == me,
            })
            .collect())
    }

    /// Revokes member `device` (DESIGN.md, "Rotation and revocation"):
    /// starts a new key epoch that it never receives and re-encrypts every
    /// record under it in the background, as [`Crypto::rotate_key`] does;
    /// the other members learn of the revocation with the new key, and
    /// devices that join later from its record. From then on the revoked
    /// device cannot read what is written, and every member that knows of
    /// the revocation refuses what the device signs afterwards.
    ///
    /// Revocation is final for that device id. Errors: the device is not a
    /// member, is this device, or is revoked already
    /// ([`KeyError::CannotRevoke`]); nothing changes then. When the
    /// revocation's record could not be written ([`KeyError::Failed`]: the
    /// device is revoked all the same), calling this again writes it.
    pub async fn revoke_device(&self, device: DeviceId) -> Result<Rotation, KeyError> {
        if self.store.is_read_only() {
            return Err(KeyError::ReadOnly);
        }
        // Everything the device stamped up to now stands; what it stamps
        // later (by its own clock, which may lag) is refused.
        let at = Hlc {
            ms: self.store.now_ms(),
            counter: u16::MAX,
        };
        let revocation = match self
            .call(|reply| KeyManagerMsg::Revoke { device, at, reply })
            .await
        {
            Ok(revocation) => revocation,
            Err(e @ KeyError::CannotRevoke(RevokeError::AlreadyRevoked(_))) => {
                // Revoked before, but its record may have failed to be
                // written: that is what is left to do.
                let unrecorded = self
                    .store
                    .unrecorded_revocation(device)
                    .map_err(|e| KeyError::Failed(e.to_string()))?;
                match unrecorded {
                    Some(revocation) => revocation,
                    None => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        self.store.kick_courier();
        self.store
            .record_revocation(&revocation)
            .await
            .map_err(|e| {
                KeyError::Failed(format!(
                    "device {device} is revoked and the new key is in place, but the \
                     revocation's record could not be written ({e}); devices that join \
                     later will not know of it until revoke_device is called again"
                ))
            })?;
        Ok(Rotation {
            epoch: revocation.epoch.0,
            progress: self.store.rotation_progress(),
        })
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
        key_manager::KeyError::Revoke(e) => KeyError::CannotRevoke(e),
        other => KeyError::Failed(other.to_string()),
    }
}
