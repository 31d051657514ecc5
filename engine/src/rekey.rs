//! Changing a store's relay credential (DESIGN.md, "Rotation and
//! revocation": revoking a device gives the store a new relay access token,
//! and the old one stops working).
//!
//! [`rekey`] speaks `persist/1` to the relay: `Hello` with the current
//! credential, then `Rekey` with the new one, and waits for `Rekeyed`. The
//! relay swaps its fingerprint only if the credential this conversation was
//! admitted with is still the store's (a compare-and-swap), durably, and
//! then refuses every other conversation that holds the old one.
//!
//! It is safe to call again after any failure: a change that happened but
//! whose answer was lost is found by trying the new credential once the old
//! one is refused, and reported as done.
//!
//! The caller must have made the new relay token durable (in the keyring)
//! before calling: once the relay has switched, the old token no longer
//! opens the store.

use std::time::Duration;

use persist_actors::peer_session::{Connector, Link};
use persist_core::protocol::{AccessKey, ErrorCode, Hello, Message, PROTOCOL_VERSION};
use persist_core::{DeviceId, StoreId};

use crate::pairing::LinkError;

/// How long the relay has to answer one message of the exchange.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Makes `new` the credential of `store` on the relay behind `connector`,
/// in place of `old`.
///
/// Errors: [`LinkError::Down`] when the relay is unreachable, the
/// connection dropped, or the relay's storage is unavailable (retry);
/// [`LinkError::Refused`] with [`ErrorCode::Unauthorized`] when neither
/// credential opens the store (someone else changed it), with
/// [`ErrorCode::Protocol`] when the relay does not know `Rekey` (an older
/// relay, or a device serving its store).
pub(crate) async fn rekey(
    connector: &dyn Connector,
    store: StoreId,
    old: AccessKey,
    new: AccessKey,
    device: DeviceId,
    admission: Option<String>,
) -> Result<(), LinkError> {
    let hello = |access: AccessKey| {
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            store,
            access,
            device,
            admission: admission.clone(),
        })
    };
    let mut link = match open(connector, &hello(old)).await {
        Ok(link) => link,
        Err(LinkError::Refused(ErrorCode::Unauthorized, text)) => {
            // Done by an earlier call whose answer was lost, or by someone
            // else: the new credential tells which.
            return match open(connector, &hello(new)).await {
                Ok(_) => Ok(()),
                Err(LinkError::Refused(ErrorCode::Unauthorized, _)) => {
                    Err(LinkError::Refused(ErrorCode::Unauthorized, text))
                }
                Err(other) => Err(other),
            };
        }
        Err(other) => return Err(other),
    };
    match ask(&mut link, &Message::Rekey { access: new }).await? {
        Message::Rekeyed => {
            // The relay has its answer; a failure to end the stream
            // politely changes nothing.
            let _ = link.send.finish().await;
            Ok(())
        }
        other => Err(LinkError::Down(format!(
            "expected Rekeyed, got {}",
            other.kind()
        ))),
    }
}

/// A conversation admitted by `hello`.
async fn open(connector: &dyn Connector, hello: &Message) -> Result<Link, LinkError> {
    let mut link = connector.connect().await.map_err(LinkError::Down)?;
    match ask(&mut link, hello).await? {
        Message::Welcome(_) => Ok(link),
        other => Err(LinkError::Down(format!(
            "expected Welcome, got {}",
            other.kind()
        ))),
    }
}

/// Sends `message` and reads the answer; an `Error` becomes a
/// [`LinkError`], retryable codes as `Down`.
async fn ask(link: &mut Link, message: &Message) -> Result<Message, LinkError> {
    link.send
        .send(message)
        .await
        .map_err(|e| LinkError::Down(e.to_string()))?;
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, link.recv.recv())
        .await
        .map_err(|_| LinkError::Down("the relay did not answer".into()))?
        .map_err(|e| LinkError::Down(e.to_string()))?
        .ok_or_else(|| LinkError::Down("the relay closed the connection".into()))?;
    match answer {
        Message::Error { code, text } if code.is_retryable() => Err(LinkError::Down(text)),
        Message::Error { code, text } => Err(LinkError::Refused(code, text)),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use persist_actors::peer_session::ConnectFuture;
    use persist_relay::{Admission, SessionContext};
    use persist_storage::relay::{MemoryRelay, RelayBackend, RelayError};

    use super::*;

    /// Each connection is a relay session over an in-memory pipe.
    struct InProcess {
        relay: Arc<MemoryRelay>,
        ctx: Arc<SessionContext>,
    }

    impl Connector for InProcess {
        fn connect(&self) -> ConnectFuture<'_> {
            let (relay, ctx) = (self.relay.clone(), self.ctx.clone());
            Box::pin(async move {
                let ((send, recv), (server_tx, server_rx)) = persist_transport::memory::pair();
                tokio::spawn(async move {
                    persist_relay::serve(&*relay, &ctx, server_tx, server_rx).await;
                });
                Ok(Link {
                    send,
                    recv,
                    guard: Box::new(()),
                })
            })
        }

        fn remote(&self) -> String {
            "memory://relay".into()
        }
    }

    const STORE: StoreId = StoreId([3; 16]);
    const DEVICE: DeviceId = DeviceId([4; 16]);

    fn relay_with_store() -> InProcess {
        InProcess {
            relay: Arc::new(MemoryRelay::new()),
            ctx: Arc::new(SessionContext::new(Admission::Open)),
        }
    }

    async fn opens(relay: &InProcess, access: &AccessKey) -> Result<(), RelayError> {
        relay
            .relay
            .open_store(&STORE, &access.fingerprint(), false)
            .await
            .map(|_| ())
    }

    #[tokio::test]
    async fn the_new_credential_replaces_the_old() {
        let relay = relay_with_store();
        let (old, new) = (AccessKey([1; 32]), AccessKey([2; 32]));
        relay
            .relay
            .open_store(&STORE, &old.fingerprint(), true)
            .await
            .unwrap();
        rekey(&relay, STORE, old.clone(), new.clone(), DEVICE, None)
            .await
            .unwrap();
        assert_eq!(opens(&relay, &old).await, Err(RelayError::Unauthorized));
        assert_eq!(opens(&relay, &new).await, Ok(()));

        // Again, as after a lost answer: already done.
        rekey(&relay, STORE, old.clone(), new.clone(), DEVICE, None)
            .await
            .unwrap();
        assert_eq!(opens(&relay, &new).await, Ok(()));

        // Neither credential is the store's: refused, nothing changed.
        let err = rekey(
            &relay,
            STORE,
            AccessKey([7; 32]),
            AccessKey([8; 32]),
            DEVICE,
            None,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, LinkError::Refused(ErrorCode::Unauthorized, _)),
            "{err:?}"
        );
        assert_eq!(opens(&relay, &new).await, Ok(()));
    }

    #[tokio::test]
    async fn a_server_without_rekey_refuses_it() {
        /// A backend that keeps the default `rekey`.
        struct Fixed(MemoryRelay);
        impl RelayBackend for Fixed {
            async fn open_store(
                &self,
                store: &StoreId,
                fingerprint: &[u8; 32],
                may_create: bool,
            ) -> Result<persist_storage::relay::StoreAccess, RelayError> {
                self.0.open_store(store, fingerprint, may_create).await
            }
            async fn append(
                &self,
                store: &StoreId,
                entries: Vec<persist_storage::relay::Incoming>,
            ) -> Result<persist_storage::relay::Appended, RelayError> {
                self.0.append(store, entries).await
            }
            async fn pull(
                &self,
                store: &StoreId,
                since: u64,
                limit: usize,
                bytes_target: usize,
            ) -> Result<persist_storage::relay::Page, RelayError> {
                self.0.pull(store, since, limit, bytes_target).await
            }
            async fn head(&self, store: &StoreId) -> Result<u64, RelayError> {
                self.0.head(store).await
            }
            fn watch(&self, store: &StoreId) -> tokio::sync::watch::Receiver<u64> {
                self.0.watch(store)
            }
            async fn mailbox_put(
                &self,
                store: &StoreId,
                mailbox: &DeviceId,
                payload: Vec<u8>,
            ) -> Result<u64, RelayError> {
                self.0.mailbox_put(store, mailbox, payload).await
            }
            async fn mailbox_fetch(
                &self,
                store: &StoreId,
                mailbox: &DeviceId,
                since: u64,
                limit: usize,
            ) -> Result<Vec<persist_core::protocol::MailboxItem>, RelayError> {
                self.0.mailbox_fetch(store, mailbox, since, limit).await
            }
            async fn mailbox_ack(
                &self,
                store: &StoreId,
                mailbox: &DeviceId,
                upto: u64,
            ) -> Result<(), RelayError> {
                self.0.mailbox_ack(store, mailbox, upto).await
            }
            async fn stats(&self) -> Result<persist_storage::relay::RelayStats, RelayError> {
                self.0.stats().await
            }
        }

        let backend = Arc::new(Fixed(MemoryRelay::new()));
        let old = AccessKey([1; 32]);
        backend
            .open_store(&STORE, &old.fingerprint(), true)
            .await
            .unwrap();
        let ctx = SessionContext::new(Admission::Never);
        let ((send, recv), (server_tx, server_rx)) = persist_transport::memory::pair();
        let server = persist_relay::serve(&*backend, &ctx, server_tx, server_rx);
        let client = async {
            let mut link = Link {
                send,
                recv,
                guard: Box::new(()),
            };
            let welcome = ask(
                &mut link,
                &Message::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    store: STORE,
                    access: old.clone(),
                    device: DEVICE,
                    admission: None,
                }),
            )
            .await;
            assert!(matches!(welcome, Ok(Message::Welcome(_))), "{welcome:?}");
            let rekey = Message::Rekey {
                access: AccessKey([2; 32]),
            };
            ask(&mut link, &rekey).await
        };
        let (end, answer) = tokio::join!(server, client);
        match answer {
            Err(LinkError::Refused(ErrorCode::Protocol, text)) => {
                assert!(text.contains("access credential"), "{text}");
            }
            other => panic!("expected a Protocol refusal, got {other:?}"),
        }
        assert_eq!(end, persist_relay::SessionEnd::Refused(ErrorCode::Protocol));
        assert_eq!(
            backend
                .open_store(&STORE, &old.fingerprint(), false)
                .await
                .map(|_| ()),
            Ok(()),
            "nothing changed"
        );
    }
}
