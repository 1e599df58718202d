//! An in-process event bus and a subscriber that logs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use ratelimit_domain::{EventBus, RateLimitEvent, Result};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// An [`EventBus`] on a Tokio broadcast channel.
///
/// Publishing never waits: each subscriber has a bounded queue, and one that falls behind
/// loses its oldest events (it is told how many on its next receive) instead of slowing
/// checks down. With no subscriber, checks do not build events at all
/// ([`EventBus::is_listening`]).
///
/// What subscribers lose is reported: a subscriber that is told it fell behind adds the
/// number to [`dropped_counter`](Self::dropped_counter) (the event logger and
/// `ratelimit-http`'s metrics subscriber do), and [`dropped`](Self::dropped) reads the sum.
#[derive(Debug, Clone)]
pub struct BroadcastEventBus {
    sender: broadcast::Sender<RateLimitEvent>,
    /// Whether anyone ever subscribed. Until then [`EventBus::is_listening`] is one atomic load;
    /// the channel's own count takes a lock, once per check.
    ever_subscribed: Arc<AtomicBool>,
    /// Events subscribers reported lost (one count per subscriber that lost it).
    dropped: Arc<AtomicU64>,
}

impl BroadcastEventBus {
    /// Events a subscriber may fall behind by before it loses the oldest.
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// A bus whose subscribers may fall `capacity` events behind (at least 1).
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self {
            sender,
            ever_subscribed: Arc::new(AtomicBool::new(false)),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records that a subscriber lost `missed` events by falling behind (what its receiver's
    /// [`RecvError::Lagged`](broadcast::error::RecvError::Lagged) said).
    pub fn record_dropped(&self, missed: u64) {
        self.dropped.fetch_add(missed, Ordering::Relaxed);
    }

    /// The counter behind [`dropped`](Self::dropped), for a subscriber task to add what it
    /// lost to (`fetch_add(missed, Relaxed)`) without holding the bus: a task holding a bus
    /// clone would keep the channel open and never see it close.
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }

    /// Events lost by subscribers that fell behind, as they reported them
    /// ([`record_dropped`](Self::record_dropped)); an event two subscribers lost counts twice.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A new subscriber, receiving every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RateLimitEvent> {
        self.ever_subscribed.store(true, Ordering::Release);
        self.sender.subscribe()
    }

    /// How many subscribers are listening.
    pub fn subscriber_count(&self) -> usize {
        self.sender.receiver_count()
    }
}

impl Default for BroadcastEventBus {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

#[async_trait]
impl EventBus for BroadcastEventBus {
    async fn publish(&self, event: RateLimitEvent) -> Result<()> {
        // An error only means that nobody is subscribed, which is not a failure.
        let _ = self.sender.send(event);
        Ok(())
    }

    fn is_listening(&self) -> bool {
        self.ever_subscribed.load(Ordering::Acquire) && self.sender.receiver_count() > 0
    }
}

/// Spawns a task that logs every event of `bus` through `tracing` (denials at `info`, the
/// rest at `debug`) until the bus is dropped. Must be called within a Tokio runtime.
pub fn spawn_event_logger(bus: &BroadcastEventBus) -> JoinHandle<()> {
    let mut events = bus.subscribe();
    let dropped = bus.dropped_counter();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => log(&event),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    dropped.fetch_add(missed, Ordering::Relaxed);
                    tracing::warn!(
                        missed,
                        "rate-limit event logger fell behind; events were skipped"
                    );
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    })
}

fn log(event: &RateLimitEvent) {
    match event {
        RateLimitEvent::Attempted(e) => {
            tracing::debug!(event_id = %e.event_id, endpoint = %e.endpoint, identifier = %e.identifier, scope = %e.scope, cost = e.cost, "rate limit check attempted");
        }
        RateLimitEvent::Allowed(e) => {
            tracing::debug!(event_id = %e.event_id, endpoint = %e.endpoint, identifier = %e.identifier, scope = %e.scope, remaining = e.remaining_tokens, source = e.source.as_str(), elapsed_us = e.execution_time.as_micros(), "rate limit check allowed");
        }
        RateLimitEvent::Denied(e) => {
            let limit = e.refused_by.as_deref().unwrap_or("");
            tracing::info!(event_id = %e.event_id, endpoint = %e.endpoint, identifier = %e.identifier, scope = %e.scope, limit, retry_after_s = e.retry_after.as_secs_f64(), elapsed_us = e.execution_time.as_micros(), "rate limit check denied");
        }
        _ => tracing::debug!(kind = event.kind(), "rate limit event"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratelimit_domain::RateLimitScope;

    use super::*;

    fn event(i: usize) -> RateLimitEvent {
        RateLimitEvent::attempted("GET /x".into(), i.to_string().into(), RateLimitScope::Ip, 1)
    }

    #[tokio::test]
    async fn subscribers_receive_events_in_order() {
        let bus = BroadcastEventBus::new(8);
        let mut rx = bus.subscribe();
        for i in 0..3 {
            bus.publish(event(i)).await.unwrap();
        }
        for i in 0..3 {
            assert_eq!(rx.recv().await.unwrap().identifier(), i.to_string());
        }
    }

    #[tokio::test]
    async fn a_slow_subscriber_never_blocks_publishing() {
        let bus = BroadcastEventBus::new(4);
        let mut slow = bus.subscribe();
        // Far more events than the subscriber's queue holds; publish must return at once.
        let published = tokio::time::timeout(Duration::from_secs(5), async {
            for i in 0..10_000 {
                bus.publish(event(i)).await.unwrap();
            }
        })
        .await;
        assert!(published.is_ok());
        assert!(matches!(
            slow.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        // After the lag report the subscriber resumes with the newest events.
        assert_eq!(slow.recv().await.unwrap().identifier(), "9996");
    }

    #[tokio::test]
    async fn the_bus_reports_what_a_lagging_logger_lost() {
        let bus = BroadcastEventBus::new(4);
        assert_eq!(bus.dropped(), 0);
        let logger = spawn_event_logger(&bus);
        // Published without yielding: the logger cannot keep up with a queue of 4.
        for i in 0..100 {
            bus.publish(event(i)).await.unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while bus.dropped() < 96 {
            assert!(tokio::time::Instant::now() < deadline, "{}", bus.dropped());
            tokio::task::yield_now().await;
        }
        assert_eq!(bus.dropped(), 96);
        bus.record_dropped(4);
        assert_eq!(bus.dropped(), 100);
        // The logger holds no sender: dropping the bus ends it.
        drop(bus);
        tokio::time::timeout(Duration::from_secs(5), logger)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn it_is_listening_exactly_while_someone_subscribes() {
        let bus = BroadcastEventBus::default();
        let copy = bus.clone();
        assert!(!bus.is_listening());
        let rx = copy.subscribe();
        assert!(bus.is_listening() && copy.is_listening());
        drop(rx);
        assert!(!bus.is_listening());
        let _again = bus.subscribe();
        assert!(copy.is_listening());
    }

    #[tokio::test]
    async fn publishing_without_subscribers_is_fine() {
        assert!(BroadcastEventBus::default().publish(event(0)).await.is_ok());
    }
}
