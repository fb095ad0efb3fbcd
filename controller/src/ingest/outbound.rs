//! The stream of messages towards one Envoy: the answers of its stream task (acks, the final
//! status) and, once its hello is registered, every new directive and the keep-alive.
//!
//! Directives are taken from the publisher's `watch` here, in the response stream that tonic
//! polls, rather than by the stream task that reads reports: a publish then wakes one task per
//! stream (the response body's), not a stream task that wakes the body through a channel. And
//! each stream hands tonic the directive's bytes, encoded once per generation by the publisher.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio::time::Sleep;
use tokio_stream::wrappers::WatchStream;
use tonic::Status;
use weir_proto::codec::Outgoing;
use weir_proto::v1::controller_message::Kind;
use weir_proto::v1::{Ack, ControllerMessage};

use super::directives::Published;

/// What a stream task has to say to its Envoy.
#[derive(Debug)]
pub(super) enum Reply {
    /// The hello is registered: send the directive in force, then keep sending new ones.
    Start,
    /// Acknowledge reports.
    Ack(Ack),
    /// End the stream with this status.
    End(Status),
}

/// The sending half, kept by the stream task.
pub(super) type Replies = mpsc::Sender<Reply>;

/// The response stream of one `Exchange`.
pub struct Downstream {
    replies: mpsc::Receiver<Reply>,
    /// The publisher's directive, read on `Reply::Start` and for keep-alives.
    current: watch::Receiver<Published>,
    /// Changes of the directive; None until `Reply::Start`.
    changes: Option<WatchStream<Published>>,
    /// The generation last sent, so a change that was already sent is skipped.
    sent_generation: Option<u64>,
    keepalive_every: Duration,
    keepalive: Pin<Box<Sleep>>,
    ended: bool,
}

impl Downstream {
    /// A stream over `replies` and the directives of `current`, re-sending the directive after
    /// `keepalive_every` without any message.
    pub(super) fn new(
        replies: mpsc::Receiver<Reply>,
        current: watch::Receiver<Published>,
        keepalive_every: Duration,
    ) -> Self {
        Self {
            replies,
            current,
            changes: None,
            sent_generation: None,
            keepalive_every,
            keepalive: Box::pin(tokio::time::sleep(keepalive_every)),
            ended: false,
        }
    }

    fn directive(&mut self, published: &Published) -> Outgoing {
        self.sent_generation = Some(published.directive.generation);
        Outgoing::Encoded(published.encoded.clone())
    }
}

impl Stream for Downstream {
    type Item = Result<Outgoing, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        let item = 'item: {
            // The stream task's answers first: they say where the stream stands.
            match this.replies.poll_recv(cx) {
                Poll::Ready(Some(Reply::Start)) => {
                    let published = this.current.borrow_and_update().clone();
                    // Changes after the one just read; the read one is skipped by generation.
                    this.changes = Some(WatchStream::from_changes(this.current.clone()));
                    break 'item Ok(this.directive(&published));
                }
                Poll::Ready(Some(Reply::Ack(ack))) => {
                    break 'item Ok(Outgoing::Message(ControllerMessage {
                        kind: Some(Kind::Ack(ack)),
                    }))
                }
                Poll::Ready(Some(Reply::End(status))) => {
                    this.ended = true;
                    break 'item Err(status);
                }
                // The stream task ended without a status: the Envoy went away.
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => {}
            }
            let Some(changes) = &mut this.changes else {
                return Poll::Pending;
            };
            loop {
                match Pin::new(&mut *changes).poll_next(cx) {
                    Poll::Ready(Some(published)) => {
                        // Only the one already sent is skipped: on a relay, a new leader's
                        // generation may be below the old one's, and it is the one in force.
                        if this.sent_generation == Some(published.directive.generation) {
                            continue;
                        }
                        break 'item Ok(this.directive(&published));
                    }
                    // The publisher is gone: the ingest is shutting down, and the stream task
                    // ends the stream.
                    Poll::Ready(None) => {
                        this.changes = None;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            // Nothing was sent for a keep-alive period: the directive again, so an idle Envoy
            // does not take the silence for a lost controller.
            match this.keepalive.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let published = this.current.borrow().clone();
                    break 'item Ok(this.directive(&published));
                }
                Poll::Pending => return Poll::Pending,
            }
        };
        // Anything sent counts as contact, so the keep-alive restarts after it.
        let next = tokio::time::Instant::now() + this.keepalive_every;
        this.keepalive.as_mut().reset(next);
        Poll::Ready(Some(item))
    }
}
