//! Framing of `persist/1` messages over any byte stream.
//!
//! A frame is a `u32` big-endian length followed by that many bytes of a
//! postcard-encoded [`Message`]. [`FrameSender`] writes frames to any
//! [`AsyncWrite`]; [`FrameReceiver`] reads them from any [`AsyncRead`].
//! The same code frames a QUIC stream ([`crate::quic`]) and an in-memory
//! pipe ([`crate::memory`]).
//!
//! # Invariants
//! - No frame longer than [`FRAME_BYTES_MAX`] is written, and a declared
//!   length over it is refused from the 4-byte prefix alone, before any
//!   buffer for the payload exists. A payload buffer grows only as its
//!   bytes actually arrive, so a peer that declares a large frame and then
//!   stalls costs no more memory than it sent.
//! - Every message [`FrameReceiver::recv`] returns passed
//!   [`Message::check_bounds`]; every message [`FrameSender::send`] writes
//!   passed it too, so a bound violation is reported on the side that
//!   caused it.
//! - EOF exactly between frames is a clean end ([`None`]); EOF anywhere
//!   inside a frame is [`FrameError::Truncated`].
//! - After any error other than a clean end the stream is out of step:
//!   the caller drops the conversation (the protocol has no resync).

use std::io;

use persist_core::protocol::{BoundError, FRAME_BYTES_MAX, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// What a receive buffer starts at before the payload arrives: large enough
/// that the common small frame needs one allocation, small enough that a
/// declared-but-unsent frame costs nothing worth attacking.
const RECV_BUFFER_INITIAL_BYTES: usize = 64 * 1024;

const _: () = assert!(RECV_BUFFER_INITIAL_BYTES <= FRAME_BYTES_MAX);
const _: () = assert!(
    FRAME_BYTES_MAX <= u32::MAX as usize,
    "a frame length must fit the u32 prefix"
);

/// A boxed writer, so that callers of [`SendHalf`] are not generic.
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;
/// A boxed reader, so that callers of [`RecvHalf`] are not generic.
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// The sending half of a conversation, whatever carries it.
pub type SendHalf = FrameSender<BoxWrite>;
/// The receiving half of a conversation, whatever carries it.
pub type RecvHalf = FrameReceiver<BoxRead>;

/// Sending or receiving a frame failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The underlying stream failed (the peer went away, the connection
    /// was closed or reset).
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    /// A frame's length is over the protocol's limit. On receive this is
    /// refused from the length prefix alone.
    #[error(
        "frame of {len} bytes exceeds the persist/1 limit of {max} bytes: the peer is broken or \
         hostile"
    )]
    TooLarge {
        /// The declared (or, sending, the encoded) length.
        len: usize,
        /// [`FRAME_BYTES_MAX`].
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("connection ended inside a frame: {received} of {expected} bytes arrived")]
    Truncated {
        /// Bytes the frame (prefix or payload) needed.
        expected: usize,
        /// Bytes that arrived before the end.
        received: usize,
    },
    /// The payload is not a `persist/1` message.
    #[error("frame is not a persist/1 message: {0}")]
    Decode(postcard::Error),
    /// A message could not be encoded (a bug in this build, not the peer).
    #[error("message could not be encoded: {0}")]
    Encode(postcard::Error),
    /// The message breaks a bound of the protocol.
    #[error("message breaks a persist/1 bound: {0}")]
    Bounds(#[from] BoundError),
}

impl FrameError {
    /// Whether this only means the peer or the connection went away (as
    /// opposed to the peer sending something wrong), so a server can log it
    /// quietly.
    pub fn is_disconnect(&self) -> bool {
        match self {
            FrameError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::NotConnected
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

/// Decodes one frame's payload and checks its bounds.
pub fn decode(payload: &[u8]) -> Result<Message, FrameError> {
    let message: Message = postcard::from_bytes(payload).map_err(FrameError::Decode)?;
    message.check_bounds()?;
    Ok(message)
}

/// Writes messages as frames.
pub struct FrameSender<W> {
    writer: W,
    bytes_sent: u64,
}

impl<W: AsyncWrite + Unpin> FrameSender<W> {
    /// Frames messages onto `writer`.
    pub fn new(writer: W) -> Self {
        Self {
            writer,
            bytes_sent: 0,
        }
    }

    /// Sends one message as one frame. Refuses a message over a bound or
    /// over [`FRAME_BYTES_MAX`] without writing anything.
    pub async fn send(&mut self, msg: &Message) -> Result<(), FrameError> {
        msg.check_bounds()?;
        let mut frame = vec![0u8; LENGTH_PREFIX_BYTES];
        frame = postcard::to_extend(msg, frame).map_err(FrameError::Encode)?;
        let len = frame.len() - LENGTH_PREFIX_BYTES;
        if len > FRAME_BYTES_MAX {
            return Err(FrameError::TooLarge {
                len,
                max: FRAME_BYTES_MAX,
            });
        }
        let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge {
            len,
            max: FRAME_BYTES_MAX,
        })?;
        frame[..LENGTH_PREFIX_BYTES].copy_from_slice(&prefix.to_be_bytes());
        self.writer.write_all(&frame).await?;
        self.writer.flush().await?;
        self.bytes_sent += frame.len() as u64;
        Ok(())
    }

    /// Ends the stream cleanly: the peer reads EOF after the last frame.
    /// Over QUIC this resolves once the peer has received every byte (so
    /// closing the connection afterwards loses nothing); callers bound it
    /// with a timeout.
    pub async fn finish(&mut self) -> Result<(), FrameError> {
        self.writer.shutdown().await?;
        Ok(())
    }

    /// Bytes written so far, prefixes included.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.writer
    }
}

impl<W: AsyncWrite + Send + Unpin + 'static> FrameSender<W> {
    /// Boxes the writer, so the sender has the one type [`SendHalf`].
    pub fn boxed(self) -> SendHalf {
        FrameSender {
            writer: Box::new(self.writer),
            bytes_sent: self.bytes_sent,
        }
    }
}

/// Reads frames and decodes them into messages.
pub struct FrameReceiver<R> {
    reader: R,
    bytes_received: u64,
}

impl<R: AsyncRead + Unpin> FrameReceiver<R> {
    /// Reads frames from `reader`.
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            bytes_received: 0,
        }
    }

    /// The next message; `None` when the stream ended cleanly between frames.
    pub async fn recv(&mut self) -> Result<Option<Message>, FrameError> {
        match self.recv_frame().await? {
            Some(payload) => decode(&payload).map(Some),
            None => Ok(None),
        }
    }

    /// The next frame's payload, undecoded, so a server can read the
    /// version of a `Hello` before decoding it (see
    /// [`persist_core::protocol::peek_hello_version`]); decode it with
    /// [`decode`]. `None` when the stream ended cleanly between frames.
    pub async fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        let mut filled = 0;
        while filled < LENGTH_PREFIX_BYTES {
            let n = self.reader.read(&mut prefix[filled..]).await?;
            if n == 0 {
                if filled == 0 {
                    return Ok(None);
                }
                return Err(FrameError::Truncated {
                    expected: LENGTH_PREFIX_BYTES,
                    received: filled,
                });
            }
            filled += n;
        }
        let len = u32::from_be_bytes(prefix) as usize;
        if len > FRAME_BYTES_MAX {
            return Err(FrameError::TooLarge {
                len,
                max: FRAME_BYTES_MAX,
            });
        }
        let mut payload = Vec::with_capacity(len.min(RECV_BUFFER_INITIAL_BYTES));
        (&mut self.reader)
            .take(len as u64)
            .read_to_end(&mut payload)
            .await?;
        if payload.len() < len {
            return Err(FrameError::Truncated {
                expected: len,
                received: payload.len(),
            });
        }
        self.bytes_received += (LENGTH_PREFIX_BYTES + len) as u64;
        Ok(Some(payload))
    }

    /// Bytes of complete frames read so far, prefixes included.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.reader
    }
}

impl<R: AsyncRead + Send + Unpin + 'static> FrameReceiver<R> {
    /// Boxes the reader, so the receiver has the one type [`RecvHalf`].
    pub fn boxed(self) -> RecvHalf {
        FrameReceiver {
            reader: Box::new(self.reader),
            bytes_received: self.bytes_received,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use persist_core::protocol::{
        AccessKey, ENTRIES_PER_MESSAGE_MAX, ErrorCode, Hello, LogEntry, PROTOCOL_VERSION, PushEntry,
    };
    use persist_core::{DeviceId, Locator, StoreId};
    use tokio::io::ReadBuf;

    use super::*;

    fn hello() -> Message {
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            store: StoreId([1; 16]),
            access: AccessKey([2; 32]),
            device: DeviceId([3; 16]),
            admission: None,
        })
    }

    fn frame_of(payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(payload);
        out
    }

    async fn receive(bytes: Vec<u8>) -> Result<Option<Message>, FrameError> {
        FrameReceiver::new(bytes.as_slice()).recv().await
    }

    #[tokio::test]
    async fn messages_round_trip_and_end_cleanly() {
        let messages = vec![
            hello(),
            Message::Push {
                id: 7,
                entries: vec![PushEntry {
                    locator: Locator([4; 32]),
                    envelope: vec![9; 5000],
                }],
            },
            Message::Batch {
                entries: vec![LogEntry {
                    seq: 1,
                    locator: Locator([5; 32]),
                    envelope: vec![1, 2, 3],
                }],
                cursor: 1,
                more: false,
            },
            Message::error(ErrorCode::Unavailable, "later"),
            Message::Subscribe,
        ];
        let mut sender = FrameSender::new(Vec::new());
        for m in &messages {
            sender.send(m).await.expect("sends");
        }
        let sent = sender.bytes_sent();
        let bytes = sender.into_inner();
        assert_eq!(sent, bytes.len() as u64);

        let mut receiver = FrameReceiver::new(bytes.as_slice());
        for m in &messages {
            assert_eq!(receiver.recv().await.expect("receives").as_ref(), Some(m));
        }
        assert!(receiver.recv().await.expect("clean end").is_none());
        assert_eq!(receiver.bytes_received(), sent);
    }

    #[tokio::test]
    async fn raw_frame_allows_a_version_peek() {
        let mut sender = FrameSender::new(Vec::new());
        sender.send(&hello()).await.expect("sends");
        let bytes = sender.into_inner();
        let payload = FrameReceiver::new(bytes.as_slice())
            .recv_frame()
            .await
            .expect("reads")
            .expect("one frame");
        assert_eq!(
            persist_core::protocol::peek_hello_version(&payload),
            Some(PROTOCOL_VERSION)
        );
        assert_eq!(decode(&payload).expect("decodes"), hello());
    }

    /// A reader that serves a length prefix and then panics if anyone asks
    /// for the payload: proof that an oversize frame is refused from the
    /// prefix alone.
    struct PrefixOnly {
        prefix: [u8; 4],
        served: bool,
    }

    impl AsyncRead for PrefixOnly {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            assert!(!self.served, "the payload of an oversize frame was read");
            buf.put_slice(&self.prefix);
            self.served = true;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn oversize_length_is_refused_before_reading_or_allocating() {
        for len in [FRAME_BYTES_MAX as u32 + 1, u32::MAX] {
            let mut receiver = FrameReceiver::new(PrefixOnly {
                prefix: len.to_be_bytes(),
                served: false,
            });
            match receiver.recv().await {
                Err(FrameError::TooLarge { len: got, max }) => {
                    assert_eq!(got, len as usize);
                    assert_eq!(max, FRAME_BYTES_MAX);
                }
                other => panic!("expected TooLarge, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_frame_of_exactly_the_limit_is_allowed_through_the_length_check() {
        // The length passes; the stream then ends early, which proves the
        // limit itself is inclusive without sending 16 MiB.
        let prefix = (FRAME_BYTES_MAX as u32).to_be_bytes().to_vec();
        match receive(prefix).await {
            Err(FrameError::Truncated { expected, received }) => {
                assert_eq!(expected, FRAME_BYTES_MAX);
                assert_eq!(received, 0);
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn truncated_frames_are_errors_not_clean_ends() {
        let mut full = FrameSender::new(Vec::new());
        full.send(&hello()).await.expect("sends");
        let bytes = full.into_inner();

        // Inside the prefix.
        match receive(bytes[..2].to_vec()).await {
            Err(FrameError::Truncated { expected, received }) => {
                assert_eq!((expected, received), (4, 2));
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
        // Inside the payload.
        let cut = bytes.len() - 3;
        match receive(bytes[..cut].to_vec()).await {
            Err(FrameError::Truncated { expected, received }) => {
                assert_eq!(expected, bytes.len() - 4);
                assert_eq!(received, cut - 4);
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
        // Nothing at all is a clean end.
        assert!(receive(Vec::new()).await.expect("clean").is_none());
    }

    #[tokio::test]
    async fn garbage_payloads_are_decode_errors() {
        for garbage in [vec![], vec![0xff; 10], vec![200, 1, 2, 3]] {
            match receive(frame_of(&garbage)).await {
                Err(FrameError::Decode(_)) => {}
                other => panic!("expected Decode for {garbage:?}, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn bounds_are_checked_both_ways() {
        let too_many = Message::Push {
            id: 1,
            entries: vec![
                PushEntry {
                    locator: Locator([0; 32]),
                    envelope: Vec::new(),
                };
                ENTRIES_PER_MESSAGE_MAX + 1
            ],
        };
        let mut sender = FrameSender::new(Vec::new());
        assert!(matches!(
            sender.send(&too_many).await,
            Err(FrameError::Bounds(_))
        ));
        assert!(sender.into_inner().is_empty(), "nothing was written");

        let payload = postcard::to_stdvec(&too_many).expect("encodes");
        match receive(frame_of(&payload)).await {
            Err(FrameError::Bounds(e)) => assert_eq!(e.what, "push entries"),
            other => panic!("expected Bounds, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn oversize_messages_are_not_sent() {
        // Many entries, each small enough, together over the frame limit.
        let envelope = vec![0u8; FRAME_BYTES_MAX / 512];
        let push = Message::Push {
            id: 1,
            entries: vec![
                PushEntry {
                    locator: Locator([0; 32]),
                    envelope,
                };
                600
            ],
        };
        let mut sender = FrameSender::new(Vec::new());
        assert!(matches!(
            sender.send(&push).await,
            Err(FrameError::TooLarge { .. })
        ));
        assert!(sender.into_inner().is_empty(), "nothing was written");
    }
}
