//! An in-memory conversation: two connected ends over a
//! [`tokio::io::duplex`] pipe, for tests and simulations.
//!
//! Each end is a ([`SendHalf`], [`RecvHalf`]) pair, the same types a QUIC
//! stream gives, so code that serves or drives a conversation cannot tell
//! the difference. The pipe has no faults; fault injection belongs to the
//! simulation harness that wraps it.

use crate::frame::{FrameReceiver, FrameSender, RecvHalf, SendHalf};

/// Bytes buffered in each direction before a writer waits for the reader:
/// enough for many small frames, small enough to exercise backpressure.
pub const PIPE_BUFFER_BYTES: usize = 64 * 1024;

/// Two connected conversation ends: what one sends, the other receives.
pub fn pair() -> ((SendHalf, RecvHalf), (SendHalf, RecvHalf)) {
    let (a, b) = tokio::io::duplex(PIPE_BUFFER_BYTES);
    (end(a), end(b))
}

fn end(stream: tokio::io::DuplexStream) -> (SendHalf, RecvHalf) {
    let (read, write) = tokio::io::split(stream);
    (
        FrameSender::new(write).boxed(),
        FrameReceiver::new(read).boxed(),
    )
}

#[cfg(test)]
mod tests {
    use persist_core::protocol::Message;

    use super::*;

    #[tokio::test]
    async fn ends_are_connected_both_ways_and_finish_is_eof() {
        let ((mut a_tx, mut a_rx), (mut b_tx, mut b_rx)) = pair();
        a_tx.send(&Message::Subscribe).await.expect("sends");
        assert_eq!(
            b_rx.recv().await.expect("receives"),
            Some(Message::Subscribe)
        );
        b_tx.send(&Message::Notify { head: 3 })
            .await
            .expect("sends");
        assert_eq!(
            a_rx.recv().await.expect("receives"),
            Some(Message::Notify { head: 3 })
        );
        a_tx.finish().await.expect("finishes");
        assert_eq!(b_rx.recv().await.expect("clean end"), None);
    }

    #[tokio::test]
    async fn large_frames_pass_through_the_small_pipe() {
        let ((mut a_tx, _a_rx), (_b_tx, mut b_rx)) = pair();
        let payload = vec![7u8; 60 * 1024];
        let msg = Message::MailboxPut {
            to: persist_core::DeviceId([1; 16]),
            payload,
        };
        let expected = msg.clone();
        let send = tokio::spawn(async move { a_tx.send(&msg).await });
        assert_eq!(b_rx.recv().await.expect("receives"), Some(expected));
        send.await.expect("joins").expect("sends");
    }
}
