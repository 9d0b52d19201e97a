//! `List`, bounded: what the node holds for the Lists in progress, and for how long.
//!
//! A List copies only the keys, in order, and reads the values a chunk at a time as the client
//! takes them (`kvstore_actors::Listing`), so what it holds is its keys plus what waits in its
//! buffer, which is bounded in bytes (a window, each chunk's share given back once the client has
//! taken it). All Lists together may hold at most `--max-list-memory`: a List that would pass it
//! waits a moment for others to finish, then is refused with RESOURCE_EXHAUSTED. A List whose
//! client takes nothing for `--list-idle-timeout` is ended, and the client is told why when it
//! reads again. A Backup is a List of every entry, tombstones and versions included, under
//! the same bounds.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kvstore_actors::coordinator::{Listing, RingListing};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::Status;

use crate::error::Error;
use crate::pb::KeyValue;

/// Chunks a List holds ready beyond what the client has taken, at most (the window bounds
/// their bytes).
const BUFFER: usize = 4;
/// And the bytes they may hold together (a pair bigger than this goes alone).
const WINDOW: usize = 1024 * 1024;
/// Keys whose values are read at once, and the bytes after which a chunk stops.
pub const CHUNK: usize = 256;
pub const CHUNK_BYTES: usize = 256 * 1024;
/// What a List holds beyond its keys, at most: its window, and the chunk waiting for room in
/// it. A chunk ends once it passes CHUNK_BYTES, so it may hold one value more (up to the
/// largest value a node takes, 1 MiB by default), and a chunk bigger than the window counts
/// as the whole window.
const PER_LIST: usize = 2 * (WINDOW + CHUNK_BYTES);
/// How long a List waits for room under the memory bound before it is refused.
const WAIT_FOR_ROOM: Duration = Duration::from_secs(1);
/// The unit the bound is counted in: a semaphore counts permits in a u32.
const UNIT: usize = 1024;

/// The bound on what all Lists hold together, and on how long one may wait for its client.
#[derive(Clone, Debug)]
pub struct ListBounds {
    room: Arc<Semaphore>,
    max_bytes: usize,
    idle_timeout: Duration,
}

impl ListBounds {
    pub fn new(max_bytes: usize, idle_timeout: Duration) -> Self {
        let units = (max_bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Self {
            room: Arc::new(Semaphore::new(units)),
            max_bytes,
            idle_timeout,
        }
    }

    /// Room for a List that holds `bytes`, waiting briefly for others to finish.
    async fn reserve(&self, bytes: usize) -> Result<OwnedSemaphorePermit, Status> {
        let units = bytes.div_ceil(UNIT).max(1);
        let too_big = || {
            Error::ResourceExhausted(format!(
                "this List would hold {} MiB, and the Lists in progress hold {} MiB of the \
                 node's {} MiB for Lists (--max-list-memory); try again when they finish",
                mib(bytes),
                mib(self.held()),
                mib(self.max_bytes)
            ))
        };
        let units = u32::try_from(units).map_err(|_| Status::from(too_big()))?;
        let acquired =
            tokio::time::timeout(WAIT_FOR_ROOM, self.room.clone().acquire_many_owned(units)).await;
        match acquired {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; a List bigger than the whole bound never fits.
            Ok(Err(_)) | Err(_) => Err(too_big().into()),
        }
    }

    /// Bytes the Lists in progress hold, as reserved.
    fn held(&self) -> usize {
        let total = (self.max_bytes / UNIT).max(1);
        total.saturating_sub(self.room.available_permits()) * UNIT
    }

    /// Streams `listing` to the client, within the bounds.
    pub async fn stream(&self, listing: Listing) -> Result<ListStream, Status> {
        let held = listing.key_bytes() + PER_LIST;
        let room = self.reserve(held).await?;
        let chunks = futures::stream::unfold(listing, |mut listing| async move {
            let chunk: Vec<KeyValue> = (listing.next_chunk(CHUNK, CHUNK_BYTES).into_iter())
                .map(|(key, value)| KeyValue {
                    key,
                    value,
                    ..Default::default()
                })
                .collect();
            (!chunk.is_empty()).then_some((Ok(chunk), listing))
        });
        Ok(forward(chunks, Some(room), self.idle_timeout, "List"))
    }

    /// Streams a List over a ring to the client, within the same bounds: what it holds is
    /// this node's keys, its own window, and what each stream from a peer may buffer.
    pub async fn stream_ring(&self, listing: RingListing) -> Result<ListStream, Status> {
        let held = listing.key_bytes + PER_LIST * (1 + listing.remote);
        let room = self.reserve(held).await?;
        let chunks = listing.chunks.map(|chunk| {
            let chunk = chunk.map_err(|e| Status::from(Error::from(e)))?;
            Ok((chunk.into_iter())
                .map(|(key, value)| KeyValue {
                    key,
                    value,
                    ..Default::default()
                })
                .collect())
        });
        Ok(forward(chunks, Some(room), self.idle_timeout, "List"))
    }

    /// Streams `listing`'s entries to the client, tombstones included, each with its version,
    /// within the same bounds as a List: a Backup is a List of everything, as of one instant.
    pub async fn backup(&self, listing: Listing) -> Result<ListStream, Status> {
        let held = listing.key_bytes() + PER_LIST;
        let room = self.reserve(held).await?;
        let chunks = futures::stream::unfold(listing, |mut listing| async move {
            let chunk: Vec<KeyValue> = (listing.next_entries(CHUNK, CHUNK_BYTES).into_iter())
                .map(KeyValue::from)
                .collect();
            (!chunk.is_empty()).then_some((Ok(chunk), listing))
        });
        Ok(forward(chunks, Some(room), self.idle_timeout, "Backup"))
    }
}

/// Sends `chunks` on to the client from a task of its own, holding `room` until the stream
/// ends however it ends, and ending it if the client takes nothing for `idle`. An error in
/// `chunks` ends the stream with that error.
///
/// Pairs travel a chunk at a time: a window share, a timer and a channel send per pair were
/// most of a List's cost on the node.
fn forward(
    chunks: impl Stream<Item = Result<Vec<KeyValue>, Status>> + Send + 'static,
    room: Option<OwnedSemaphorePermit>,
    idle: Duration,
    call: &'static str,
) -> ListStream {
    let (tx, rx) = mpsc::channel(BUFFER);
    let window = Arc::new(Semaphore::new(WINDOW / UNIT));
    let ended = Arc::new(OnceLock::new());
    let why = ended.clone();
    let taken = Arc::new(AtomicU64::new(0));
    let reading = taken.clone();
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        let _room = room;
        let mut chunks = std::pin::pin!(chunks);
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(status) => {
                    tracing::warn!(error = %status.message(), call, "stream ended: {call} failed");
                    let _ = why.set(status);
                    return;
                }
            };
            // The chunk's share of the window, given back once the client has taken all of it.
            let bytes: usize = chunk.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
            let units = bytes.div_ceil(UNIT).clamp(1, WINDOW / UNIT) as u32;
            let send = async {
                let share = window.clone().acquire_many_owned(units).await;
                let share = share.expect("the window is never closed");
                tx.send((chunk, share)).await
            };
            let mut send = std::pin::pin!(send);
            // Room comes back a chunk at a time, so a client reading slowly can keep this
            // waiting for longer than `idle`: only a client that took nothing at all in that
            // time is given up on.
            let sent = loop {
                let before = taken.load(Ordering::Relaxed);
                match tokio::time::timeout(idle, &mut send).await {
                    Ok(sent) => break Some(sent),
                    Err(_) if taken.load(Ordering::Relaxed) != before => {}
                    Err(_) => break None,
                }
            };
            match sent {
                Some(Ok(())) => {}
                None => {
                    tracing::info!(idle = ?idle, call, "stream ended: its client took nothing");
                    let _ = why.set(Status::resource_exhausted(format!(
                        "{call} ended: the client took nothing for {} \
                         (--list-idle-timeout), and the node does not hold a {call} \
                         for a reader that does not read",
                        humantime::format_duration(idle)
                    )));
                    return;
                }
                // The client went away: stop, and let what the stream holds go.
                Some(Err(_)) => return,
            }
        }
    }));
    ListStream {
        rx,
        current: Vec::new().into_iter(),
        share: None,
        taken: reading,
        ended,
    }
}

fn mib(bytes: usize) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// A List's (or a Backup's) stream: its entries, then, if the node ended it, why.
pub struct ListStream {
    rx: mpsc::Receiver<(Vec<KeyValue>, OwnedSemaphorePermit)>,
    /// The chunk being taken, and its share of the window.
    current: std::vec::IntoIter<KeyValue>,
    share: Option<OwnedSemaphorePermit>,
    /// Pairs the client has taken, which the sender watches to tell slow from gone.
    taken: Arc<AtomicU64>,
    ended: Arc<OnceLock<Status>>,
}

impl Stream for ListStream {
    type Item = Result<KeyValue, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(kv) = self.current.next() {
                self.taken.fetch_add(1, Ordering::Relaxed);
                return Poll::Ready(Some(Ok(kv)));
            }
            // The taken chunk's share of the window goes back before the next is waited for.
            self.share = None;
            match self.rx.poll_recv(cx) {
                Poll::Ready(None) => {
                    // Once: the stream then ends.
                    let ended = std::mem::replace(&mut self.ended, Arc::new(OnceLock::new()));
                    return Poll::Ready(ended.get().cloned().map(Err));
                }
                Poll::Ready(Some((chunk, share))) => {
                    self.current = chunk.into_iter();
                    self.share = Some(share);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `chunks` chunks of `pairs` small pairs each.
    fn chunks(
        chunks: usize,
        pairs: usize,
    ) -> impl Stream<Item = Result<Vec<KeyValue>, Status>> + Send {
        futures::stream::iter((0..chunks).map(move |c| {
            Ok((0..pairs)
                .map(|p| KeyValue {
                    key: format!("k{c:03}-{p:03}"),
                    value: "v".into(),
                    ..Default::default()
                })
                .collect())
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_served_to_the_end_and_a_stalled_one_is_ended() {
        let idle = Duration::from_millis(300);
        // A pair every 60 ms: a chunk of 10 takes twice the idle time to drain, but the
        // reader never goes `idle` without taking something.
        let mut slow = forward(chunks(12, 10), None, idle, "List");
        let mut got = 0;
        while let Some(pair) = slow.next().await {
            pair.expect("a reader that keeps reading is not cut off");
            got += 1;
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        assert_eq!(got, 120);

        // One that takes a pair and then nothing for longer than `idle` is told why.
        let mut stalled = forward(chunks(12, 10), None, idle, "List");
        stalled.next().await.unwrap().unwrap();
        tokio::time::sleep(idle * 3).await;
        let mut rest = Vec::new();
        while let Some(pair) = stalled.next().await {
            rest.push(pair);
        }
        let end = rest.pop().expect("the stream ends with why").unwrap_err();
        assert_eq!(end.code(), tonic::Code::ResourceExhausted);
        assert!(end.message().contains("--list-idle-timeout"), "{end}");
        assert!(rest.iter().all(Result::is_ok));
        assert!(
            rest.len() < 119,
            "only what was queued before it was ended: {}",
            rest.len()
        );
    }

    /// A source that fails (a peer of a ring gone mid-List) ends the stream with its error,
    /// after every pair sent before it.
    #[tokio::test]
    async fn a_failing_source_ends_the_stream_with_its_error() {
        let failing = chunks(3, 10).chain(futures::stream::iter([Err(Status::unavailable(
            "db2 stopped sending",
        ))]));
        let mut stream = forward(failing, None, Duration::from_secs(30), "List");
        let mut pairs = Vec::new();
        while let Some(pair) = stream.next().await {
            pairs.push(pair);
        }
        let end = pairs.pop().unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Unavailable);
        assert_eq!(end.message(), "db2 stopped sending");
        assert_eq!(pairs.len(), 30);
        assert!(pairs.iter().all(Result::is_ok));
    }
}
