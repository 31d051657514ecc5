//! KeyManager: the owner of the device KEK and the store keyring.
//!
//! **Role.** Holds the unsealed [`Keyring`] and the KEK that seals it, and
//! hands out [`KeySet`]s (data keys and index key, never the KEK) to the
//! Sealer and to readers. Key lifecycle operations (rotation, export,
//! invites, revocation) are its messages as they land.
//!
//! **Messages.** [`KeyManagerMsg::Keys`] returns the current key set;
//! [`KeyManagerMsg::Describe`] returns the epochs and their states.
//!
//! **Supervisor.** The store supervisor. **On failure** it is restarted
//! from the same keyring and KEK; it holds no state that is not already
//! durable in the sealed keyring.

use std::sync::Arc;

use persist_core::Epoch;
use persist_core::keyring::{EpochState, Keyring};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::keys::KeySet;

/// Messages to the KeyManager.
pub enum KeyManagerMsg {
    /// The current key set.
    Keys(RpcReplyPort<Arc<KeySet>>),
    /// The epochs and their states.
    Describe(RpcReplyPort<Vec<(Epoch, EpochState)>>),
}

/// What KeyManager starts from.
#[derive(Clone)]
pub struct KeyManagerArgs {
    /// The unsealed keyring, or `None` for a store that does not encrypt.
    pub keyring: Option<Arc<Keyring>>,
    /// The key set derived from it (or the plain one).
    pub keys: Arc<KeySet>,
}

/// The KeyManager actor.
pub struct KeyManager;

/// KeyManager's state.
pub struct KeyManagerState {
    keyring: Option<Arc<Keyring>>,
    keys: Arc<KeySet>,
}

impl Actor for KeyManager {
    type Msg = KeyManagerMsg;
    type State = KeyManagerState;
    type Arguments = KeyManagerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: KeyManagerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(KeyManagerState {
            keyring: args.keyring,
            keys: args.keys,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            KeyManagerMsg::Keys(reply) => {
                // The caller may have given up waiting; nothing to undo.
                let _ = reply.send(state.keys.clone());
            }
            KeyManagerMsg::Describe(reply) => {
                let epochs = state
                    .keyring
                    .as_ref()
                    .map(|r| {
                        r.epochs
                            .iter()
                            .map(|(e, entry)| (*e, entry.state))
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = reply.send(epochs);
            }
        }
        Ok(())
    }
}
