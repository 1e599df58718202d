//! Tower middleware that rate-limits HTTP requests (work in progress).
