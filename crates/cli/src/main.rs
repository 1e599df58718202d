//! The `ratelimit` admin command (work in progress).

fn main() {}
