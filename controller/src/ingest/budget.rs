//! One memory budget for report bytes that have arrived but are not yet a decoded report, shared
//! by every stream of the server.
//!
//! tonic's decoder buffers each stream's message until it is whole, and keeps that buffer's
//! capacity for the rest of the stream. The decoding limit bounds one message, but not how many
//! streams hold one: without a shared bound, every connection × stream could hold a
//! message-limit's worth of a report that never completes (1 MiB × 4 streams × 16,384
//! connections). So each stream's request body is wrapped: it follows the gRPC framing of the
//! bytes it hands to tonic, and holds budget for the largest message (header included) it has
//! made tonic buffer so far, until the stream ends. A frame that would take the server past its
//! budget ends that stream with `RESOURCE_EXHAUSTED` instead; the reporter reconnects and
//! resends later. A real reporter's reports are a few KiB, so its hold is small.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Semaphore;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::Status;

use super::counters::{RejectReason, Rejection};

/// gRPC's length-prefix: one flag byte and a 4-byte big-endian length.
const PREFIX: usize = 5;

/// The shared budget, in bytes.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    bytes: Arc<Semaphore>,
    limit: usize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            // A semaphore holds at most usize::MAX >> 3 permits.
            bytes: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
            limit,
        }
    }

    /// Bytes of the budget in use now.
    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        self.limit.min(Semaphore::MAX_PERMITS) - self.bytes.available_permits()
    }
}

/// Follows the gRPC framing of a request body: how many bytes of the message in progress have
/// been seen.
#[derive(Debug, Default, Clone)]
pub(crate) struct Framing {
    prefix: [u8; PREFIX],
    prefix_len: usize,
    /// Payload bytes of the current message still to come (once the prefix is complete).
    remaining: usize,
    /// Bytes of the current (incomplete) message seen, prefix included.
    partial: usize,
}

impl Framing {
    /// Feeds the next bytes; returns the largest number of bytes of one message that were
    /// buffered at once while feeding them (a whole message counts as buffered in full: tonic
    /// holds it until it decodes it).
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> usize {
        let mut peak = self.partial;
        while !data.is_empty() {
            if self.prefix_len < PREFIX {
                let take = (PREFIX - self.prefix_len).min(data.len());
                self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
                self.prefix_len += take;
                self.partial += take;
                data = &data[take..];
                if self.prefix_len == PREFIX {
                    let [_, a, b, c, d] = self.prefix;
                    self.remaining = u32::from_be_bytes([a, b, c, d]) as usize;
                }
            } else {
                let take = self.remaining.min(data.len());
                self.remaining -= take;
                self.partial += take;
                data = &data[take..];
            }
            peak = peak.max(self.partial);
            if self.prefix_len == PREFIX && self.remaining == 0 {
                *self = Self::default();
            }
        }
        peak
    }
}

/// A request body that holds budget for what it makes tonic buffer.
pub(crate) struct BudgetedBody<B> {
    inner: B,
    budget: Budget,
    framing: Framing,
    /// Bytes of the budget this stream holds: the largest message it has buffered so far.
    held: usize,
}

impl<B> BudgetedBody<B> {
    pub(crate) fn new(inner: B, budget: Budget) -> Self {
        Self {
            inner,
            budget,
            framing: Framing::default(),
            held: 0,
        }
    }

    /// Takes budget up to `peak` bytes; false if the server has none left.
    fn hold(&mut self, peak: usize) -> bool {
        if peak <= self.held {
            return true;
        }
        let more = peak - self.held;
        let Ok(more_permits) = u32::try_from(more) else {
            return false;
        };
        match self.budget.bytes.try_acquire_many(more_permits) {
            Ok(permits) => {
                permits.forget();
                self.held = peak;
                true
            }
            Err(_) => false,
        }
    }
}

impl<B> Drop for BudgetedBody<B> {
    fn drop(&mut self) {
        self.budget.bytes.add_permits(self.held);
    }
}

impl<B> Body for BudgetedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let peak = this.framing.feed(data);
            if !this.hold(peak) {
                let rejection = Rejection::new(
                    RejectReason::BufferFull,
                    format!(
                        "the controller holds its maximum of {} bytes of reports in transit \
                         (across all streams); this stream's {peak}-byte report is refused, \
                         resend it later (or raise the controller's buffer budget)",
                        this.budget.limit
                    ),
                );
                return Poll::Ready(Some(Err(Box::new(rejection.status()))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The telemetry service with every request body under the [`Budget`].
#[derive(Clone)]
pub(crate) struct Budgeted<S> {
    inner: S,
    budget: Budget,
}

impl<S> Budgeted<S> {
    pub(crate) fn new(inner: S, budget: Budget) -> Self {
        Self { inner, budget }
    }
}

impl<S: NamedService> NamedService for Budgeted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Budgeted<S>
where
    S: Service<http::Request<BudgetedBody<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let budget = self.budget.clone();
        self.inner
            .call(request.map(|body| BudgetedBody::new(body, budget)))
    }
}

/// Whether a stream's error is this budget's refusal (nothing else in the decoding path says
/// `RESOURCE_EXHAUSTED`: the server accepts no compressed messages).
pub(crate) fn is_buffer_full(status: &Status) -> bool {
    status.code() == tonic::Code::ResourceExhausted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        bytes.extend(std::iter::repeat_n(7, len));
        bytes
    }

    #[test]
    fn framing_reports_the_largest_message_buffered_across_chunks() {
        let mut framing = Framing::default();
        let first = message(100);
        assert_eq!(framing.feed(&first[..3]), 3);
        assert_eq!(framing.feed(&first[3..50]), 50);
        // The rest of the first message, and the start of a second of 10 bytes.
        let mut rest = first[50..].to_vec();
        rest.extend_from_slice(&message(10)[..7]);
        assert_eq!(framing.feed(&rest), 105);
        assert_eq!(framing.feed(&message(10)[7..]), 15);
        // Back at a message boundary.
        assert_eq!(framing.feed(&[]), 0);
        // An empty message is its prefix alone.
        assert_eq!(framing.feed(&message(0)), 5);
    }

    #[test]
    fn the_budget_is_held_for_the_largest_message_until_the_stream_ends() {
        let budget = Budget::new(1000);
        let mut body = BudgetedBody::new(http_body_util::Empty::<Bytes>::new(), budget.clone());
        assert!(body.hold(300));
        assert!(body.hold(100), "a smaller message holds nothing more");
        assert_eq!(budget.in_use(), 300);
        let mut other = BudgetedBody::new(http_body_util::Empty::<Bytes>::new(), budget.clone());
        assert!(!other.hold(701), "past the budget");
        assert!(other.hold(700));
        assert_eq!(budget.in_use(), 1000);
        drop(body);
        assert_eq!(budget.in_use(), 700);
        drop(other);
        assert_eq!(budget.in_use(), 0);
    }
}
