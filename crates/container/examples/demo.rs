//! A short simulation of traffic against three rules, printing every decision.
//!
//! Run it with `just demo` (in-memory store), or against Redis with
//! `REDIS_URL=redis://127.0.0.1:6379 just demo`.

#![allow(clippy::print_stdout)]

use std::error::Error;
use std::time::Duration;

use ratelimit_container::{Container, ContainerConfig};
use ratelimit_domain::{
    DecisionSource, EndpointLimits, Limit, ManualClock, RateLimitResult, RateLimitRule,
    RateLimitScope, RateLimiterExt, RuleSet,
};

const LOGIN: &str = "POST /api/v1/sessions";
const ITEMS: &str = "GET /api/v1/items";
const EXPORT: &str = "POST /api/v1/exports";
const SEARCH: &str = "GET /api/v1/search";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut rules = RuleSet::try_from_rules([
        // Five login attempts per IP, one more every 12 seconds.
        (LOGIN, RateLimitRule::new(RateLimitScope::Ip, 5, 5.0)?),
        // 10 API calls per user, refilled at 30 per minute.
        (ITEMS, RateLimitRule::new(RateLimitScope::User, 10, 30.0)?),
        // Exports cost 4 of a user's 10 tokens, refilled at 2 per minute.
        (
            EXPORT,
            RateLimitRule::new(RateLimitScope::User, 10, 2.0)?.with_cost(4)?,
        ),
    ])?;
    // Search: 3 per client IP and 5 for everybody together, checked all or nothing.
    rules.insert_limits(
        SEARCH,
        EndpointLimits::new(vec![
            Limit::named(
                "per-client",
                RateLimitRule::new(RateLimitScope::Ip, 3, 3.0)?,
            )?,
            Limit::named(
                "everyone",
                RateLimitRule::new(RateLimitScope::Global, 5, 5.0)?,
            )?,
        ])?,
    )?;

    // The memory backend runs on a clock the demo can move; Redis uses its own TIME.
    let clock = ManualClock::starting_now();
    let config = ContainerConfig::from_env(rules)
        .with_clock(clock.clone())
        .with_key_prefix("ratelimit_demo")
        .with_event_logging(false);
    let container = Container::build(config).await?;
    let limiter = container.rate_limiter();
    let on_redis = container.backend_name() == "redis";
    println!("ratelimit demo on the {} backend", container.backend_name());

    // Start from full buckets, so that repeated runs against Redis look the same.
    for (endpoint, who) in [
        (LOGIN, "203.0.113.7"),
        (ITEMS, "alice"),
        (ITEMS, "bob"),
        (EXPORT, "alice"),
        (SEARCH, "203.0.113.7"),
        (SEARCH, "198.51.100.4"),
    ] {
        limiter.reset(endpoint, who).await?;
    }
    limiter.reset_limit(SEARCH, "-", "everyone").await?;

    section("1. A login burst from one IP (5 tokens, 1 every 12 s)");
    for attempt in 1..=7 {
        let result = limiter.is_allowed(LOGIN, "203.0.113.7").await?;
        show(
            &format!("login attempt {attempt} from 203.0.113.7"),
            &result,
        );
    }
    let other = limiter.is_allowed(LOGIN, "198.51.100.4").await?;
    show("login attempt 1 from 198.51.100.4", &other);
    if on_redis {
        println!("   (Redis keeps its own clock: waiting 12 s for a token)");
        tokio::time::sleep(Duration::from_secs(12)).await;
    } else {
        println!("   ... 12 seconds later (the memory backend's clock is moved, not slept) ...");
        clock.advance(Duration::from_secs(12));
    }
    show(
        "login attempt 8 from 203.0.113.7",
        &limiter.is_allowed(LOGIN, "203.0.113.7").await?,
    );

    section("2. A user's API calls (10 tokens per user, 30 per minute)");
    for call in 1..=12 {
        let result = limiter.is_allowed(ITEMS, "alice").await?;
        if call <= 2 || call >= 10 {
            show(&format!("alice call {call}"), &result);
        } else if call == 3 {
            println!("   ...");
        }
    }
    show(
        "bob call 1 (his own bucket)",
        &limiter.is_allowed(ITEMS, "bob").await?,
    );
    println!(
        "   alice has {} tokens left (peeking takes none)",
        limiter.get_remaining(ITEMS, "alice").await?
    );

    section("3. An expensive export (cost 4 of 10, 2 per minute)");
    for n in 1..=3 {
        show(
            &format!("alice export {n}"),
            &limiter.is_allowed(EXPORT, "alice").await?,
        );
    }
    show(
        "alice export costing 20 tokens",
        &limiter.is_allowed_with_cost(EXPORT, "alice", 20).await?,
    );
    limiter.reset(EXPORT, "alice").await?;
    show(
        "alice export after a support-desk reset",
        &limiter.is_allowed(EXPORT, "alice").await?,
    );

    section("4. Two limits on one endpoint (3 per client, 5 for everybody; all or nothing)");
    for n in 1..=4 {
        show(
            &format!("search {n} from 203.0.113.7"),
            &limiter.is_allowed(SEARCH, "203.0.113.7").await?,
        );
    }
    for n in 1..=3 {
        show(
            &format!("search {n} from 198.51.100.4"),
            &limiter.is_allowed(SEARCH, "198.51.100.4").await?,
        );
    }
    let status = limiter.status(SEARCH, "198.51.100.4").await?;
    for limit in &status.limits {
        println!(
            "   198.51.100.4, limit {:<12} {} of {} tokens left",
            limit.name, limit.remaining, limit.limit
        );
    }
    println!("   (the refused search took nothing from 198.51.100.4's own bucket)");

    section("5. An endpoint without a rule");
    show(
        "GET /healthz",
        &limiter.is_allowed("GET /healthz", "anyone").await?,
    );
    Ok(())
}

fn section(title: &str) {
    println!("\n{title}");
}

fn show(what: &str, result: &RateLimitResult) {
    let verdict = if result.allowed { "allowed" } else { "DENIED " };
    let detail = match (result.allowed, result.source) {
        (_, DecisionSource::NoRule) => "no rule: not limited".to_owned(),
        (_, DecisionSource::FailOpen) => {
            "store unreachable: allowed by the fail-open policy".to_owned()
        }
        (true, _) => format!("{} of {} tokens left", result.remaining, result.limit),
        (false, _) if result.retry_never() => {
            "costs more than the bucket holds: never allowed".to_owned()
        }
        (false, _) => format!("retry after {:.2} s", result.retry_after.as_secs_f64()),
    };
    let detail = match result.deciding() {
        Some(limit) if result.limits.len() > 1 => format!("{detail} (limit {})", limit.name),
        _ => detail,
    };
    println!("   {what:<42} {verdict}  {detail}");
}
