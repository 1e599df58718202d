#![allow(clippy::unwrap_used)]
//! End-to-end tests of the `ratelimit` binary against a real, throwaway `redis-server`.

use std::collections::BTreeSet;

use ratelimit_domain::RateLimiterExt as _;
use ratelimit_tests::fixtures::{LOGIN, RulesFile, cli_command};
use ratelimit_tests::redis_server::{TestRedis, free_port, unique_prefix};
use serde_json::Value;

const RULES: &str = r#"
[rules."POST /api/v1/sessions"]
max_tokens = 3
refill_rate = 1.0
scope = "ip"

[rules."POST /api/v1/exports"]
max_tokens = 10
refill_rate = 2
scope = "user"
cost = 4

[rules."GET /api/v1/status"]
max_tokens = 2
refill_rate = 1.0
scope = "global"

[rules."GET /api/v1/off"]
max_tokens = 7
refill_rate = 1.0
scope = "ip"
enabled = false
"#;

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|err| panic!("stdout is not one JSON object ({err}): {self:?}"))
    }

    fn all_output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `ratelimit` with `args`, in an environment without any of the variables it reads
/// except those in `env`.
fn ratelimit(args: &[&str], env: &[(&str, &str)]) -> Run {
    let output = cli_command(env!("CARGO_BIN_EXE_ratelimit"))
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Run {
        code: output.status.code().unwrap(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// `COMMAND -e LOGIN -i IDENTIFIER --rules RULES EXTRA…`.
fn login_args<'a>(
    command: &'a str,
    identifier: &'a str,
    rules: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![command, "-e", LOGIN, "-i", identifier, "--rules", rules];
    args.extend(extra);
    args
}

/// A Redis, a key prefix of its own and the rules above.
struct Fixture {
    redis: TestRedis,
    prefix: String,
    rules: RulesFile,
}

impl Fixture {
    fn new() -> Self {
        Self::with_rules(RULES)
    }

    /// A Redis and a key prefix of its own, with the rules `text`.
    fn with_rules(text: &str) -> Self {
        Self {
            redis: TestRedis::get(),
            prefix: unique_prefix(),
            rules: RulesFile::new(text),
        }
    }

    /// A runtime, and the configuration of the service this fixture's commands address.
    fn service(
        &self,
    ) -> (
        tokio::runtime::Runtime,
        ratelimit_container::ContainerConfig,
    ) {
        let rules = ratelimit_config::load_rules_file(self.rules.path()).unwrap();
        let config = ratelimit_container::ContainerConfig::redis(self.redis.url.clone(), rules)
            .with_key_prefix(self.prefix.clone())
            .with_event_logging(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (runtime, config)
    }

    /// `ratelimit COMMAND --endpoint ENDPOINT [--identifier ID] EXTRA…` with this fixture's
    /// rules, Redis and prefix given as flags.
    fn run(&self, command: &str, endpoint: &str, identifier: Option<&str>, extra: &[&str]) -> Run {
        self.run_with(&self.rules, command, endpoint, identifier, extra)
    }

    /// As [`run`](Self::run), with the rules file `rules` instead of this fixture's.
    fn run_with(
        &self,
        rules: &RulesFile,
        command: &str,
        endpoint: &str,
        identifier: Option<&str>,
        extra: &[&str],
    ) -> Run {
        let mut args = vec![
            command,
            "--endpoint",
            endpoint,
            "--rules",
            rules.path(),
            "--redis-url",
            &self.redis.url,
            "--key-prefix",
            &self.prefix,
        ];
        if let Some(identifier) = identifier {
            args.extend(["--identifier", identifier]);
        }
        args.extend(extra);
        ratelimit(&args, &[])
    }
}

#[test]
fn check_counts_down_then_denies_with_exit_1() {
    let fx = Fixture::new();
    for left in [2, 1, 0] {
        let run = fx.run("check", LOGIN, Some("192.0.2.1"), &[]);
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(run.stdout, format!("allowed: {left} of 3 tokens left\n"));
    }
    let denied = fx.run("check", LOGIN, Some("192.0.2.1"), &[]);
    assert_eq!(denied.code, 1, "{denied:?}");
    assert!(
        denied.stdout.starts_with("denied: retry after "),
        "{denied:?}"
    );
    assert!(denied.stdout.contains("0 of 3 tokens left"), "{denied:?}");
    // Another client's bucket is untouched.
    assert_eq!(fx.run("check", LOGIN, Some("192.0.2.2"), &[]).code, 0);
}

#[test]
fn check_json_has_exactly_the_result_fields() {
    let fx = Fixture::new();
    let allowed = fx.run("check", LOGIN, Some("192.0.2.1"), &["--json"]);
    assert_eq!(allowed.code, 0, "{allowed:?}");
    let json = allowed.json();
    let fields: BTreeSet<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from([
            "allowed",
            "retry_after",
            "remaining",
            "limit",
            "reset_seconds",
            "source",
            "endpoint",
            "identifier",
            "cost",
            "refused_by",
            "limits",
        ])
    );
    assert_eq!(json["allowed"], true);
    assert_eq!(json["retry_after"].as_f64(), Some(0.0));
    assert_eq!(json["remaining"], 2);
    assert_eq!(json["limit"], 3);
    assert_eq!(json["reset_seconds"], 240);
    assert_eq!(json["source"], "store");
    assert_eq!(json["endpoint"], LOGIN);
    assert_eq!(json["identifier"], "192.0.2.1");
    assert_eq!(json["cost"], 1);
    assert_eq!(json["refused_by"], serde_json::json!([]));
    // The single-limit form has one limit, named after the endpoint.
    assert_eq!(
        json["limits"],
        serde_json::json!([{
            "name": LOGIN,
            "scope": "ip",
            "key": format!("{}:ip:192.0.2.1:{LOGIN}", fx.prefix),
            "limit": 3,
            "cost": 1,
            "remaining": 2,
            "allowed": true,
            "retry_after": 0.0,
        }])
    );

    let check_json = |cost| {
        fx.run(
            "check",
            LOGIN,
            Some("192.0.2.1"),
            &["--json", "--cost", cost],
        )
    };
    let denied = check_json("3");
    assert_eq!(denied.code, 1, "{denied:?}");
    let json = denied.json();
    assert_eq!(json["allowed"], false);
    let retry = json["retry_after"].as_f64().unwrap();
    // One token short at one token a minute: about 60 s, with sub-second precision.
    assert!(retry > 59.0 && retry <= 60.0, "{retry}");
    assert_eq!(
        (json["remaining"].clone(), json["cost"].clone()),
        (2.into(), 3.into())
    );

    // A cost the bucket can never hold: retry_after is null.
    let never = check_json("4");
    assert_eq!(never.code, 1, "{never:?}");
    assert_eq!(never.json()["retry_after"], Value::Null);
    assert!(
        fx.run("check", LOGIN, Some("192.0.2.1"), &["--cost", "4"])
            .stdout
            .contains("waiting will not help")
    );
}

#[test]
fn rule_cost_global_scope_and_disabled_rules() {
    let fx = Fixture::new();
    let export = fx.run("check", "POST /api/v1/exports", Some("alice"), &["--json"]);
    assert_eq!(
        (
            export.json()["cost"].clone(),
            export.json()["remaining"].clone()
        ),
        (4.into(), 6.into())
    );

    // The global bucket needs no identifier.
    let status = fx.run("check", "GET /api/v1/status", None, &["--json"]);
    assert_eq!(status.code, 0, "{status:?}");
    assert_eq!(status.json()["identifier"], Value::Null);
    assert_eq!(status.json()["remaining"], 1);

    // A scope with identifiers needs one.
    let missing = fx.run("check", LOGIN, None, &[]);
    assert_eq!(missing.code, 2, "{missing:?}");
    assert!(missing.stderr.contains("--identifier"), "{missing:?}");

    let off = fx.run("check", "GET /api/v1/off", Some("192.0.2.1"), &["--json"]);
    assert_eq!(off.code, 0, "{off:?}");
    assert_eq!(off.json()["source"], "rule_disabled");
}

#[test]
fn remaining_consumes_nothing() {
    let fx = Fixture::new();
    for _ in 0..3 {
        let run = fx.run("remaining", LOGIN, Some("192.0.2.1"), &[]);
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(
            run.stdout,
            format!(
                "remaining: 3 of 3 tokens left (nothing consumed)\n  key: {}:ip:192.0.2.1:{LOGIN}\n",
                fx.prefix
            )
        );
    }
    assert_eq!(fx.run("check", LOGIN, Some("192.0.2.1"), &[]).code, 0);
    let json = fx
        .run("remaining", LOGIN, Some("192.0.2.1"), &["--json"])
        .json();
    let key = format!("{}:ip:192.0.2.1:{LOGIN}", fx.prefix);
    assert_eq!(
        json,
        serde_json::json!({
            "endpoint": LOGIN,
            "identifier": "192.0.2.1",
            "key": key,
            "remaining": 2,
            "limit": 3,
            "enabled": true,
            "limits": [{
                "name": LOGIN,
                "scope": "ip",
                "key": key,
                "limit": 3,
                "cost": 1,
                "remaining": 2,
                "allowed": true,
                "retry_after": 0.0,
            }],
        })
    );
    assert_eq!(
        fx.run("remaining", LOGIN, Some("192.0.2.1"), &["--json"])
            .json()["remaining"],
        2
    );
}

#[test]
fn reset_unlocks_a_user() {
    let fx = Fixture::new();
    let user = Some("203.0.113.7");
    let mut allowed = 0;
    while fx.run("check", LOGIN, user, &[]).code == 0 {
        allowed += 1;
        assert!(allowed <= 3, "the bucket holds 3 tokens");
    }
    assert_eq!(fx.run("check", LOGIN, user, &[]).code, 1, "locked out");

    let reset = fx.run("reset", LOGIN, user, &[]);
    assert_eq!(reset.code, 0, "{reset:?}");
    assert_eq!(
        reset.stdout,
        format!(
            "reset: the bucket of 203.0.113.7 on {LOGIN} is full again (3 of 3 tokens left)\n  key: {}:ip:203.0.113.7:{LOGIN}\n",
            fx.prefix
        )
    );

    let again = fx.run("check", LOGIN, user, &[]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.stdout, "allowed: 2 of 3 tokens left\n");

    let json = fx.run("reset", LOGIN, user, &["--json"]).json();
    assert_eq!(json["reset"], true);
    assert_eq!(json["existed"], true);
    assert_eq!(json["remaining"], 3);
    assert_eq!(json["key"], format!("{}:ip:203.0.113.7:{LOGIN}", fx.prefix));
}

#[test]
fn the_cli_addresses_the_same_buckets_as_the_service() {
    let fx = Fixture::new();
    let (runtime, config) = fx.service();
    runtime.block_on(async {
        let container = ratelimit_container::Container::build(config).await.unwrap();
        let limiter = container.rate_limiter();
        let result = limiter
            .is_allowed_opts(
                LOGIN,
                "192.0.2.9",
                ratelimit_domain::CheckOptions::with_cost(2),
            )
            .await
            .unwrap();
        assert_eq!(result.remaining, 1);
    });
    let run = fx.run("remaining", LOGIN, Some("192.0.2.9"), &[]);
    assert!(
        run.stdout
            .starts_with("remaining: 1 of 3 tokens left (nothing consumed)\n"),
        "{run:?}"
    );

    // Another prefix is another service's buckets.
    let other = ratelimit(
        &login_args(
            "remaining",
            "192.0.2.9",
            fx.rules.path(),
            &[
                "--redis-url",
                &fx.redis.url,
                "--key-prefix",
                &unique_prefix(),
            ],
        ),
        &[],
    );
    assert!(other.stdout.contains("3 of 3"), "{other:?}");
}

#[test]
fn redis_url_rules_and_prefix_come_from_the_environment() {
    let fx = Fixture::new();
    let env = [
        ("REDIS_URL", fx.redis.url.as_str()),
        ("RATELIMIT_RULES", fx.rules.path()),
        ("RATELIMIT_KEY_PREFIX", fx.prefix.as_str()),
    ];
    let run = ratelimit(&["check", "-e", LOGIN, "-i", "192.0.2.1"], &env);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "allowed: 2 of 3 tokens left\n");
    // The flags' bucket is the same one.
    let flags = fx.run("remaining", LOGIN, Some("192.0.2.1"), &[]);
    assert!(flags.stdout.contains("2 of 3"), "{flags:?}");

    // An empty prefix variable means the default prefix, like an unset one.
    let default_prefix = ratelimit(
        &["remaining", "-e", LOGIN, "-i", "192.0.2.1"],
        &[env[0], env[1], ("RATELIMIT_KEY_PREFIX", "")],
    );
    assert_eq!(default_prefix.code, 0, "{default_prefix:?}");
}

#[test]
fn without_a_redis_url_admin_commands_say_they_need_redis() {
    let rules = RulesFile::new(RULES);
    for command in ["check", "remaining", "reset"] {
        let args = login_args(command, "192.0.2.1", rules.path(), &[]);
        for env in [&[][..], &[("REDIS_URL", "")][..]] {
            let run = ratelimit(&args, env);
            assert_eq!(run.code, 2, "{command}: {run:?}");
            assert!(
                run.stderr.contains("admin commands need Redis"),
                "{command}: {run:?}"
            );
            assert!(run.stdout.is_empty(), "{run:?}");
        }
    }
    let json = ratelimit(&login_args("check", "a", rules.path(), &["--json"]), &[]);
    assert_eq!(json.json()["error"]["kind"], "usage");
    assert_eq!(json.json()["error"]["exit_code"], 2);
}

#[test]
fn redis_down_is_exit_3_and_never_shows_the_password() {
    let rules = RulesFile::new(RULES);
    let url = format!("redis://u:secret@127.0.0.1:{}/0", free_port());
    for command in ["check", "remaining", "reset"] {
        for json in [false, true] {
            let mut args = login_args(
                command,
                "192.0.2.1",
                rules.path(),
                &["--redis-url", &url, "--timeout-ms", "300"],
            );
            if json {
                args.push("--json");
            }
            let run = ratelimit(&args, &[]);
            assert_eq!(run.code, 3, "{command}: {run:?}");
            assert!(!run.all_output().contains("secret"), "{command}: {run:?}");
            assert!(run.stderr.contains("redis error"), "{command}: {run:?}");
            assert!(run.stderr.contains("u:***@127.0.0.1"), "{command}: {run:?}");
            if json {
                assert_eq!(run.json()["error"]["kind"], "redis", "{run:?}");
                assert_eq!(run.json()["error"]["exit_code"], 3, "{run:?}");
            }
        }
    }
    // From the environment, too; and --help does not show the variable's value.
    let run = ratelimit(
        &login_args("check", "192.0.2.1", rules.path(), &["--timeout-ms", "300"]),
        &[("REDIS_URL", &url)],
    );
    assert_eq!(run.code, 3, "{run:?}");
    assert!(!run.all_output().contains("secret"), "{run:?}");
    let help = ratelimit(&["check", "--help"], &[("REDIS_URL", &url)]);
    assert_eq!(help.code, 0, "{help:?}");
    assert!(!help.all_output().contains("secret"), "{help:?}");
}

#[test]
fn a_bad_rules_file_is_exit_2_naming_the_field() {
    let fx = Fixture::new();
    let bad = RulesFile::new(
        "[rules.\"POST /api/v1/sessions\"]\nmax_tokens = 5\nrefill_rate = 1.0\nscope = \"ip\"\ncost = 9\n",
    );
    let run = ratelimit(
        &login_args("check", "a", bad.path(), &["--redis-url", &fx.redis.url]),
        &[],
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("field cost"), "{run:?}");
    assert!(run.stderr.contains(bad.path()), "{run:?}");

    let missing = ratelimit(
        &login_args("check", "a", "/nonexistent/rules.toml", &[]),
        &[],
    );
    assert_eq!(missing.code, 2, "{missing:?}");
    assert!(
        missing.stderr.contains("/nonexistent/rules.toml"),
        "{missing:?}"
    );

    for env in [&[][..], &[("RATELIMIT_RULES", "")][..]] {
        let mut env = env.to_vec();
        env.push(("REDIS_URL", &fx.redis.url));
        let none = ratelimit(&["check", "-e", LOGIN, "-i", "a"], &env);
        assert_eq!(none.code, 2, "{none:?}");
        assert!(
            none.stderr
                .contains("no rules file: pass --rules FILE or set RATELIMIT_RULES"),
            "{none:?}"
        );
    }
}

#[test]
fn an_unknown_endpoint_is_exit_2_for_every_command() {
    let fx = Fixture::new();
    for command in ["check", "remaining", "reset"] {
        let run = fx.run(command, "POST /api/v1/sesions", Some("192.0.2.1"), &[]);
        assert_eq!(run.code, 2, "{command}: {run:?}");
        assert!(
            run.stderr.contains(&format!(
                "no rule for endpoint \"POST /api/v1/sesions\" in {}",
                fx.rules.path()
            )),
            "{command}: {run:?}"
        );
        assert!(
            run.stderr.contains(LOGIN),
            "known endpoints are listed: {run:?}"
        );
    }
}

#[test]
fn rules_check_validates_good_and_bad_files() {
    let good = RulesFile::new(RULES);
    let run = ratelimit(&["rules", "check", good.path()], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .starts_with(&format!("valid: {} has 4 rules\n", good.path()))
    );
    assert!(
        run.stdout.contains(
            "  POST /api/v1/exports: scope=user max_tokens=10 refill_rate=2/min cost=4 enabled=true ttl=360s\n"
        ),
        "{run:?}"
    );

    let json = ratelimit(&["rules", "check", good.path(), "--json"], &[]).json();
    assert_eq!(json["valid"], true);
    let rules = json["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 4);
    assert_eq!(
        rules[0],
        serde_json::json!({
            "endpoint": "GET /api/v1/off",
            "scope": "ip",
            "max_tokens": 7,
            "refill_rate": 1.0,
            "cost": 1,
            "enabled": false,
            "ttl_seconds": 480,
            "limits": [{
                "name": "GET /api/v1/off",
                "scope": "ip",
                "max_tokens": 7,
                "refill_rate": 1.0,
                "cost": 1,
                "ttl_seconds": 480,
            }],
        })
    );

    let bad = RulesFile::new(
        "[rules.\"GET /x\"]\nmax_tokens = 5\nrefill_rate = 1.0\nscope = \"planet\"\n",
    );
    let run = ratelimit(&["rules", "check", bad.path()], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stdout.starts_with("invalid: "), "{run:?}");
    assert!(run.stdout.contains("field scope"), "{run:?}");
    let json = ratelimit(&["--json", "rules", "check", bad.path()], &[]);
    assert_eq!(json.code, 2, "{json:?}");
    let json = json.json();
    assert_eq!(json["valid"], false);
    assert_eq!(
        (json["rule"].clone(), json["field"].clone()),
        ("GET /x".into(), "scope".into())
    );
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    for args in [
        &["check", "-i", "a"][..],
        &["check", "-e", LOGIN, "-i", "a", "--cost", "0"][..],
        &["check", "-e", LOGIN, "-i", "a", "--cost", "many"][..],
        &["frobnicate"][..],
        &["rules", "check"][..],
        &[][..],
    ] {
        let run = ratelimit(args, &[]);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(!run.stderr.is_empty(), "{args:?}");
    }
    for args in [
        &["--help"][..],
        &["check", "--help"][..],
        &["--version"][..],
    ] {
        assert_eq!(ratelimit(args, &[]).code, 0, "{args:?}");
    }
    let help = ratelimit(&["check", "--help"], &[]);
    assert!(help.stdout.contains("CONSUMES"), "{help:?}");
}

#[test]
fn the_compact_layout_option_addresses_the_service_s_compact_buckets() {
    let server = ratelimit_tests::redis_server::RedisServer::start();
    let rules = RulesFile::new(RULES);
    let prefix = unique_prefix();
    let url = server.url();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&[
            "--rules",
            rules.path(),
            "--redis-url",
            url.as_str(),
            "--key-prefix",
            prefix.as_str(),
            "--layout",
            "compact",
        ]);
        ratelimit(&all, &[])
    };
    let check = ["check", "--endpoint", LOGIN, "--identifier", "203.0.113.7"];
    // The login rule holds 3 tokens.
    for _ in 0..3 {
        assert_eq!(run(&check).code, 0);
    }
    assert_eq!(run(&check).code, 1);
    // The bucket lives in the compact key, and reset clears that key.
    let key = format!("{prefix}:ip:203.0.113.7:{LOGIN}:tb");
    assert!(matches!(
        server.cmd(redis::cmd("EXISTS").arg(&key)),
        redis::Value::Int(1)
    ));
    assert_eq!(
        run(&["reset", "--endpoint", LOGIN, "--identifier", "203.0.113.7"]).code,
        0
    );
    assert!(matches!(
        server.cmd(redis::cmd("EXISTS").arg(&key)),
        redis::Value::Int(0)
    ));
    assert_eq!(run(&check).code, 0);
}

/// The service limited `[::1]` (the layer writes its bucket as `::/64`); the operator types
/// `::1`. Before the shared normalisation the CLI reset `…:ip:::1:…`, said "full again", and
/// the client stayed locked out.
#[test]
fn reset_and_remaining_find_the_bucket_the_service_used_for_an_ipv6_client() {
    let fx = Fixture::new();
    let (runtime, config) = fx.service();
    // What the HTTP layer writes for a client at [::1].
    let service_identifier =
        ratelimit_domain::IpGrouping::default().identifier("::1".parse().unwrap());
    assert_eq!(service_identifier, "::/64");
    let container = runtime.block_on(async {
        let container = ratelimit_container::Container::build(config).await.unwrap();
        for _ in 0..3 {
            let result = container
                .rate_limiter()
                .is_allowed(LOGIN, &service_identifier)
                .await
                .unwrap();
            assert!(result.allowed);
        }
        container
    });
    let key = format!("{}:ip:::/64:{LOGIN}", fx.prefix);

    for typed in ["::1", "[::1]", "0:0:0:0:0:0:0:1", "::/64"] {
        let remaining = fx.run("remaining", LOGIN, Some(typed), &["--json"]);
        assert_eq!(remaining.code, 0, "{remaining:?}");
        assert_eq!(remaining.json()["remaining"], 0, "{typed}: {remaining:?}");
        assert_eq!(remaining.json()["key"], key.as_str());
        assert_eq!(remaining.json()["identifier"], "::/64");
    }

    let reset = fx.run("reset", LOGIN, Some("::1"), &[]);
    assert_eq!(reset.code, 0, "{reset:?}");
    assert_eq!(
        reset.stdout,
        format!(
            "reset: the bucket of ::/64 on {LOGIN} is full again (3 of 3 tokens left)\n  key: {key}\n"
        )
    );
    runtime.block_on(async {
        let result = container
            .rate_limiter()
            .is_allowed(LOGIN, &service_identifier)
            .await
            .unwrap();
        assert!(result.allowed, "the service's own bucket was reset");
    });

    // The service's grouping, when it is not the default: --ipv6-prefix 128.
    let fine = fx.run(
        "remaining",
        LOGIN,
        Some("[::1]"),
        &["--ipv6-prefix", "128", "--json"],
    );
    assert_eq!(fine.json()["key"], format!("{}:ip:::1:{LOGIN}", fx.prefix));
}

#[test]
fn reset_of_a_bucket_that_does_not_exist_says_so() {
    let fx = Fixture::new();
    let run = fx.run("reset", LOGIN, Some("198.51.100.77"), &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.starts_with(&format!(
            "reset: there was no bucket to reset for 198.51.100.77 on {LOGIN}"
        )),
        "{run:?}"
    );
    assert!(!run.stdout.contains("full again"), "{run:?}");
    for hint in ["endpoint", "identifier", "--ipv6-prefix", "--key-prefix"] {
        assert!(run.stdout.contains(hint), "{hint}: {run:?}");
    }
    let json = fx.run("reset", LOGIN, Some("198.51.100.77"), &["--json"]);
    assert_eq!(json.code, 0, "{json:?}");
    assert_eq!(json.json()["existed"], false);
    assert_eq!(
        json.json()["key"],
        format!("{}:ip:198.51.100.77:{LOGIN}", fx.prefix)
    );
}

#[test]
fn an_ip_rule_refuses_an_identifier_that_is_not_an_address_unless_raw() {
    let fx = Fixture::new();
    for command in ["check", "remaining", "reset"] {
        let run = fx.run(command, LOGIN, Some("alice"), &[]);
        assert_eq!(run.code, 2, "{command}: {run:?}");
        assert!(run.stderr.contains("--raw-identifier"), "{run:?}");
        assert!(run.stdout.is_empty(), "{run:?}");
    }
    let raw = fx.run(
        "remaining",
        LOGIN,
        Some("alice"),
        &["--raw-identifier", "--json"],
    );
    assert_eq!(raw.code, 0, "{raw:?}");
    assert_eq!(raw.json()["key"], format!("{}:ip:alice:{LOGIN}", fx.prefix));
    // A user rule takes any identifier, as it is.
    let user = fx.run(
        "remaining",
        "POST /api/v1/exports",
        Some("::1"),
        &["--json"],
    );
    assert_eq!(user.json()["identifier"], "::1");
}

/// `ratelimit --json rules check FILE | true`: stdout is a pipe whose reader is gone. The CLI
/// used to panic on the write (exit 101); it now ends quietly with the command's own code.
#[test]
fn a_closed_stdout_pipe_ends_the_command_quietly() {
    let good = RulesFile::new(RULES);
    let bad =
        RulesFile::new("[rules.\"GET /x\"]\nmax_tokens = 0\nrefill_rate = 1.0\nscope = \"ip\"\n");
    for (args, expected) in [
        (vec!["--json", "rules", "check", good.path()], 0),
        (vec!["rules", "check", good.path()], 0),
        (vec!["--json", "rules", "check", bad.path()], 2),
        // An error with --json writes its JSON to stdout, the line to stderr.
        (vec!["--json", "check", "-e", LOGIN, "-i", "192.0.2.1"], 2),
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = cli_command(env!("CARGO_BIN_EXE_ratelimit"))
            .args(&args)
            .env_remove("RUST_LOG")
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        if expected == 0 {
            assert!(stderr.is_empty(), "{args:?}: {stderr}");
        }
    }
}

/// `"get /x "` (lower-case method, trailing space) can never match a request: a rule that
/// limits nothing. `rules check` used to call the file valid.
#[test]
fn rules_check_refuses_an_endpoint_no_request_can_match() {
    let bad =
        RulesFile::new("[rules.\"get /x \"]\nmax_tokens = 5\nrefill_rate = 1.0\nscope = \"ip\"\n");
    let run = ratelimit(&["rules", "check", bad.path()], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stdout.starts_with("invalid: ") && run.stdout.contains("field endpoint"),
        "{run:?}"
    );
    let json = ratelimit(&["--json", "rules", "check", bad.path()], &[]);
    assert_eq!(json.code, 2, "{json:?}");
    assert_eq!(
        (json.json()["rule"].clone(), json.json()["field"].clone()),
        ("get /x ".into(), "endpoint".into())
    );
}

/// The endpoint with several limits.
const SEARCH: &str = "GET /api/v1/search";

/// Search: 2 requests per client IP and 3 for everyone together, one token a minute each; and
/// an endpoint whose one named limit is global.
const SEARCH_RULES: &str = r#"
[rules."GET /api/v1/search"]
limits = [
  { name = "per-client", scope = "ip", max_tokens = 2, refill_rate = 1.0 },
  { name = "everyone", scope = "global", max_tokens = 3, refill_rate = 1.0 },
]
enabled = true

[rules."GET /api/v1/feed"]
limits = [
  { name = "all", scope = "global", max_tokens = 3, refill_rate = 1.0 },
]
"#;

/// Each limit of [`SEARCH_RULES`] alone on the same endpoint. A named limit's key is its
/// prefix, scope, name and endpoint, so these address the same buckets, one bucket per check:
/// they set up and inspect the buckets of the two-limit endpoint through the store's
/// single-bucket calls.
const PER_CLIENT_ONLY: &str = r#"
[rules."GET /api/v1/search"]
limits = [{ name = "per-client", scope = "ip", max_tokens = 2, refill_rate = 1.0 }]
"#;
const EVERYONE_ONLY: &str = r#"
[rules."GET /api/v1/search"]
limits = [{ name = "everyone", scope = "global", max_tokens = 3, refill_rate = 1.0 }]
"#;

/// The fixture of the tests below, with one-limit views of its buckets.
struct Search {
    fx: Fixture,
    per_client: RulesFile,
    everyone: RulesFile,
}

impl Search {
    fn new() -> Self {
        Self {
            fx: Fixture::with_rules(SEARCH_RULES),
            per_client: RulesFile::new(PER_CLIENT_ONLY),
            everyone: RulesFile::new(EVERYONE_ONLY),
        }
    }

    fn key(&self, limit: &str, identifier: Option<&str>) -> String {
        match identifier {
            Some(id) => format!("{}:ip#{limit}:{id}:{SEARCH}", self.fx.prefix),
            None => format!("{}:global#{limit}:{SEARCH}", self.fx.prefix),
        }
    }

    /// Takes `n` tokens from the per-client bucket of `identifier`, alone.
    fn take_per_client(&self, identifier: &str, n: usize) {
        for _ in 0..n {
            let run = self
                .fx
                .run_with(&self.per_client, "check", SEARCH, Some(identifier), &[]);
            assert_eq!(run.code, 0, "{run:?}");
        }
    }

    /// Takes `n` tokens from the global bucket, alone.
    fn take_everyone(&self, n: usize) {
        for _ in 0..n {
            let run = self.fx.run_with(&self.everyone, "check", SEARCH, None, &[]);
            assert_eq!(run.code, 0, "{run:?}");
        }
    }

    /// Tokens left in the per-client bucket of `identifier`, read alone.
    fn per_client_left(&self, identifier: &str) -> Value {
        let run = self.fx.run_with(
            &self.per_client,
            "remaining",
            SEARCH,
            Some(identifier),
            &["--json"],
        );
        assert_eq!(run.code, 0, "{run:?}");
        run.json()["remaining"].clone()
    }

    /// Tokens left in the global bucket, read alone.
    fn everyone_left(&self) -> Value {
        let run = self
            .fx
            .run_with(&self.everyone, "remaining", SEARCH, None, &["--json"]);
        assert_eq!(run.code, 0, "{run:?}");
        run.json()["remaining"].clone()
    }
}

/// Runs on Redis today: `reset` resets bucket by bucket.
#[test]
fn several_limits_reset_resets_the_identifier_s_buckets_and_a_global_limit_only_when_named() {
    let search = Search::new();
    let fx = &search.fx;
    let id = "192.0.2.1";
    search.take_per_client(id, 2);
    search.take_everyone(2);
    assert_eq!(search.per_client_left(id), 0);

    let reset = fx.run("reset", SEARCH, Some(id), &[]);
    assert_eq!(reset.code, 0, "{reset:?}");
    assert_eq!(
        reset.stdout,
        format!(
            "reset: the bucket of {id} on {SEARCH} is full again\n  \
             per-client (ip): 2 of 2 tokens left\n    \
             key: {}\n  \
             not reset: everyone (global), shared by every client; reset it with --limit everyone\n",
            search.key("per-client", Some(id))
        )
    );
    assert_eq!(search.per_client_left(id), 2);
    assert_eq!(search.everyone_left(), 1, "the global limit is left alone");

    // Named, the global limit is reset, and needs no identifier.
    let everyone = fx.run("reset", SEARCH, None, &["--limit", "everyone", "--json"]);
    assert_eq!(everyone.code, 0, "{everyone:?}");
    let json = everyone.json();
    assert_eq!(json["identifier"], Value::Null);
    assert_eq!(
        (json["reset"].clone(), json["existed"].clone()),
        (true.into(), true.into())
    );
    assert_eq!(json["key"], search.key("everyone", None));
    assert_eq!(json["limits"].as_array().unwrap().len(), 1);
    assert_eq!(json["limits"][0]["name"], "everyone");
    assert_eq!(json["limits"][0]["remaining"], 3);
    assert_eq!(json["not_reset"], serde_json::json!([]));
    assert_eq!(search.everyone_left(), 3);
    let text = fx.run("reset", SEARCH, None, &["--limit", "everyone"]);
    assert!(
        text.stdout.starts_with(&format!(
            "reset: there was no bucket to reset for everyone on {SEARCH} (global) (it is full)\n  \
             everyone (global): 3 of 3 tokens left\n    key: {}\n",
            search.key("everyone", None)
        )),
        "{text:?}"
    );

    // Both by name, in JSON: every key reset.
    search.take_per_client(id, 1);
    search.take_everyone(1);
    let both = fx.run(
        "reset",
        SEARCH,
        Some(id),
        &["--limit", "everyone", "--limit", "per-client", "--json"],
    );
    assert_eq!(both.code, 0, "{both:?}");
    let keys: Vec<Value> = both.json()["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|limit| limit["key"].clone())
        .collect();
    assert_eq!(
        keys,
        [
            Value::from(search.key("per-client", Some(id))),
            Value::from(search.key("everyone", None))
        ]
    );
    assert_eq!(both.json()["existed"], true);
    assert_eq!(
        (search.per_client_left(id), search.everyone_left()),
        (2.into(), 3.into())
    );

    // Nothing to reset: said, in text and JSON.
    let nothing = fx.run("reset", SEARCH, Some("198.51.100.7"), &[]);
    assert_eq!(nothing.code, 0, "{nothing:?}");
    assert!(
        nothing.stdout.starts_with(&format!(
            "reset: there was no bucket to reset for 198.51.100.7 on {SEARCH} (it is full)\n"
        )),
        "{nothing:?}"
    );
    assert!(nothing.stdout.contains("--key-prefix"), "{nothing:?}");
    let json = fx
        .run("reset", SEARCH, Some("198.51.100.7"), &["--json"])
        .json();
    assert_eq!(json["existed"], false);
    assert_eq!(json["not_reset"][0]["key"], search.key("everyone", None));
}

/// Runs on Redis today: every error is found before a bucket is touched.
#[test]
fn several_limits_usage_errors_name_the_limit() {
    let search = Search::new();
    let fx = &search.fx;
    let unknown = fx.run("reset", SEARCH, Some("192.0.2.1"), &["--limit", "evryone"]);
    assert_eq!(unknown.code, 2, "{unknown:?}");
    assert!(
        unknown.stderr.contains(&format!(
            "--limit: the rule for \"{SEARCH}\" has no limit named \"evryone\" (its limits: \
             \"per-client\", \"everyone\")"
        )),
        "{unknown:?}"
    );
    let all_global = fx.run("reset", "GET /api/v1/feed", None, &[]);
    assert_eq!(all_global.code, 2, "{all_global:?}");
    assert!(
        all_global
            .stderr
            .contains("is reset only when named, with --limit NAME"),
        "{all_global:?}"
    );
    assert_eq!(
        fx.run("reset", "GET /api/v1/feed", None, &["--limit", "all"])
            .code,
        0
    );
    for command in ["check", "remaining", "reset"] {
        let missing = fx.run(command, SEARCH, None, &["--json"]);
        assert_eq!(missing.code, 2, "{command}: {missing:?}");
        assert!(
            missing.stderr.contains(&format!(
                "the limit \"per-client\" of \"{SEARCH}\" has scope ip: pass --identifier"
            )),
            "{command}: {missing:?}"
        );
        assert_eq!(missing.json()["error"]["kind"], "usage");
    }
}

/// AWAITS the Redis multi-limit scripts (`RedisStorage::check_and_consume_all`).
#[test]
fn several_limits_check_takes_from_every_limit_or_from_none() {
    let search = Search::new();
    let fx = &search.fx;
    let id = Some("192.0.2.1");
    for (client, everyone) in [(1, 2), (0, 1)] {
        let run = fx.run("check", SEARCH, id, &[]);
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(
            run.stdout,
            format!(
                "allowed: every limit had the tokens, each took its cost\n  \
                 per-client (ip): {client} of 2 tokens left\n  \
                 everyone (global): {everyone} of 3 tokens left\n"
            )
        );
    }
    // The client is out; the global limit had the token, and keeps it.
    let denied = fx.run("check", SEARCH, id, &["--json"]);
    assert_eq!(denied.code, 1, "{denied:?}");
    let json = denied.json();
    assert_eq!(json["allowed"], false);
    assert_eq!(json["refused_by"], serde_json::json!(["per-client"]));
    let retry = json["retry_after"].as_f64().unwrap();
    assert!(retry > 59.0 && retry <= 60.0, "{retry}");
    assert_eq!(json["limits"][0]["name"], "per-client");
    assert_eq!(json["limits"][0]["allowed"], false);
    assert_eq!(
        json["limits"][0]["key"],
        search.key("per-client", Some("192.0.2.1"))
    );
    assert_eq!(
        (
            json["limits"][1]["name"].clone(),
            json["limits"][1]["allowed"].clone(),
            json["limits"][1]["remaining"].clone(),
            json["limits"][1]["retry_after"].clone()
        ),
        ("everyone".into(), true.into(), 1.into(), 0.0.into())
    );
    let text = fx.run("check", SEARCH, id, &[]);
    assert_eq!(text.code, 1, "{text:?}");
    assert!(
        text.stdout
            .starts_with("denied by per-client: retry after ")
            && text.stdout.contains("; no limit took anything\n")
            && text
                .stdout
                .contains("\n  everyone (global): had the tokens; 1 of 3 tokens left\n"),
        "{text:?}"
    );
    assert_eq!(search.everyone_left(), 1);

    // Another client takes the last global token; a third is refused by the global limit,
    // and its own bucket keeps both tokens.
    assert_eq!(fx.run("check", SEARCH, Some("192.0.2.2"), &[]).code, 0);
    let third = fx.run("check", SEARCH, Some("192.0.2.3"), &["--json"]);
    assert_eq!(third.code, 1, "{third:?}");
    assert_eq!(third.json()["refused_by"], serde_json::json!(["everyone"]));
    assert_eq!(third.json()["limits"][0]["remaining"], 2);
    assert_eq!(search.per_client_left("192.0.2.3"), 2);

    // A cost one limit can never hold.
    let never = fx.run(
        "check",
        SEARCH,
        Some("192.0.2.4"),
        &["--cost", "3", "--json"],
    );
    assert_eq!(never.code, 1, "{never:?}");
    assert_eq!(never.json()["retry_after"], Value::Null);
    assert_eq!(never.json()["refused_by"][0], "per-client");
    assert_eq!(never.json()["cost"], 3);
}

/// AWAITS the Redis multi-limit scripts: `remaining` reads every limit in one store call.
#[test]
fn several_limits_remaining_shows_every_limit_and_consumes_nothing() {
    let search = Search::new();
    let fx = &search.fx;
    let id = "192.0.2.1";
    search.take_per_client(id, 2);
    search.take_everyone(2);
    for _ in 0..2 {
        let run = fx.run("remaining", SEARCH, Some(id), &[]);
        assert_eq!(run.code, 0, "{run:?}");
        assert_eq!(
            run.stdout,
            format!(
                "remaining: a request would be refused by per-client (nothing consumed)\n  \
                 per-client (ip): 0 of 2 tokens left; short of its cost of 1, for at most 60 s\n    \
                 key: {}\n  \
                 everyone (global): 1 of 3 tokens left\n    \
                 key: {}\n",
                search.key("per-client", Some(id)),
                search.key("everyone", None)
            )
        );
    }
    let json = fx.run("remaining", SEARCH, Some(id), &["--json"]).json();
    assert_eq!(json["key"], search.key("per-client", Some(id)));
    assert_eq!(
        (json["remaining"].clone(), json["limit"].clone()),
        (0.into(), 2.into())
    );
    assert_eq!(
        json["limits"][1],
        serde_json::json!({
            "name": "everyone",
            "scope": "global",
            "key": search.key("everyone", None),
            "limit": 3,
            "cost": 1,
            "remaining": 1,
            "allowed": true,
            "retry_after": 0.0,
        })
    );
    assert_eq!(json["limits"][0]["allowed"], false);
    assert_eq!(json["limits"][0]["retry_after"], 60.0);
    assert_eq!(search.everyone_left(), 1, "nothing consumed");
}

#[test]
fn rules_check_lists_every_limit() {
    let rules = RulesFile::new(SEARCH_RULES);
    let run = ratelimit(&["rules", "check", rules.path()], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout,
        format!(
            "valid: {} has 2 rules\n  \
             GET /api/v1/feed: 1 limit, all or nothing, enabled=true\n    \
             all: scope=global max_tokens=3 refill_rate=1/min cost=1 ttl=240s\n  \
             GET /api/v1/search: 2 limits, all or nothing, enabled=true\n    \
             per-client: scope=ip max_tokens=2 refill_rate=1/min cost=1 ttl=180s\n    \
             everyone: scope=global max_tokens=3 refill_rate=1/min cost=1 ttl=240s\n",
            rules.path()
        )
    );
    let json = ratelimit(&["rules", "check", rules.path(), "--json"], &[]).json();
    assert_eq!(
        json["rules"][1],
        serde_json::json!({
            "endpoint": SEARCH,
            "enabled": true,
            "limits": [
                {"name": "per-client", "scope": "ip", "max_tokens": 2, "refill_rate": 1.0,
                 "cost": 1, "ttl_seconds": 180},
                {"name": "everyone", "scope": "global", "max_tokens": 3, "refill_rate": 1.0,
                 "cost": 1, "ttl_seconds": 240},
            ],
        })
    );

    let duplicate = RulesFile::new(&SEARCH_RULES.replace("\"everyone\"", "\"per-client\""));
    let run = ratelimit(&["rules", "check", duplicate.path()], &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stdout.starts_with(&format!(
            "invalid: rules file {}: rule \"{SEARCH}\", limit \"per-client\" (limits[1]), field name: ",
            duplicate.path()
        )),
        "{run:?}"
    );
    let json = ratelimit(&["--json", "rules", "check", duplicate.path()], &[]).json();
    assert_eq!(
        (
            json["rule"].clone(),
            json["limit"].clone(),
            json["limit_index"].clone(),
            json["field"].clone()
        ),
        (SEARCH.into(), "per-client".into(), 1.into(), "name".into())
    );
}
