//! The reset listener: a pub/sub subscription to [`RESET_CHANNEL`] that keeps itself alive.

use std::time::Duration;

use futures_util::StreamExt;
use redis::Value;

/// The pub/sub channel on which resets are announced (the payload is the bucket key).
pub const RESET_CHANNEL: &str = "ratelimit:resets";

/// The task behind [`RedisStorage::spawn_reset_listener`].
pub(crate) struct ResetListener {
    pub(crate) client: redis::Client,
    /// How long subscribing may take.
    pub(crate) connect_timeout: Duration,
    /// How often the subscription is pinged.
    pub(crate) ping_every: Duration,
    /// How long a `PING` may go unanswered.
    pub(crate) ping_timeout: Duration,
}

impl ResetListener {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);

    /// Subscribes, passes notifications on, and subscribes again after each failure, waiting
    /// 0.1 s, then twice as long after each failed attempt, up to 5 s. Runs for ever.
    pub(crate) async fn run<F>(self, on_reset: F)
    where
        F: Fn(Option<&str>) + Send + Sync,
    {
        let mut backoff = Self::FIRST_BACKOFF;
        loop {
            match self.subscribe().await {
                Ok(pubsub) => {
                    // Resets may have been missed while there was no subscription.
                    on_reset(None);
                    if self.listen(pubsub, &on_reset).await {
                        backoff = Self::FIRST_BACKOFF;
                    }
                }
                Err(err) => {
                    tracing::debug!(error = %err, "cannot subscribe to reset notifications");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Self::MAX_BACKOFF);
        }
    }

    /// A new connection, subscribed to [`RESET_CHANNEL`], within the connect deadline.
    async fn subscribe(&self) -> std::result::Result<redis::aio::PubSub, String> {
        let subscribed = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(RESET_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(self.connect_timeout, subscribed).await {
            Ok(result) => result.map_err(|err| err.to_string()),
            Err(_) => Err(format!("no subscription within {:?}", self.connect_timeout)),
        }
    }

    /// Passes the notifications on until the connection closes or a `PING` goes unanswered.
    /// Returns whether the connection worked for a while (a `PING` answered or a message
    /// received), so that the next attempt may start without waiting long.
    async fn listen<F>(&self, pubsub: redis::aio::PubSub, on_reset: &F) -> bool
    where
        F: Fn(Option<&str>) + Send + Sync,
    {
        let (mut sink, mut stream) = pubsub.split();
        let mut healthy = false;
        let mut ticks = tokio::time::interval(self.ping_every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the first PING goes one interval after subscribing.
        ticks.tick().await;
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => {
                        healthy = true;
                        if let Ok(key) = message.get_payload::<String>() {
                            on_reset(Some(&key));
                        }
                    }
                    None => {
                        tracing::warn!("reset subscription closed; subscribing again");
                        return healthy;
                    }
                },
                _ = ticks.tick() => {
                    match tokio::time::timeout(self.ping_timeout, sink.ping::<Value>()).await {
                        Ok(Ok(_)) => healthy = true,
                        Ok(Err(err)) => {
                            tracing::warn!(error = %err, "reset subscription failed; subscribing again");
                            return healthy;
                        }
                        Err(_) => {
                            tracing::warn!(
                                timeout = ?self.ping_timeout,
                                "reset subscription did not answer a PING; subscribing again"
                            );
                            return healthy;
                        }
                    }
                }
            }
        }
    }
}
