//! What shared state on Redis costs per request, next to the in-memory store, in one run: the
//! added latency and the round trips to Redis per request, with a spend cap and with a rate
//! limit, over a bare service on loopback-free in-process calls (the store is the only
//! network hop).
//!
//! ```text
//! cargo bench --bench shared_state --features redis
//! ```
//!
//! It starts its own `redis-server` from PATH on a free loopback port, and says so and stops
//! when there is none. Under `cargo test --benches` it runs a few requests only.

#[cfg(feature = "redis")]
#[path = "../tests/support/redis.rs"]
mod redis_server;

#[cfg(not(feature = "redis"))]
fn main() {
    println!("shared_state: build with `--features redis` to measure the Redis store");
}

#[cfg(feature = "redis")]
fn main() {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tower::{Layer, Service, ServiceExt};
    use tower_llm_resilience::Policy;
    use tower_llm_resilience::budget::{BudgetLayer, BudgetStore};
    use tower_llm_resilience::policy::{Price, RateLimitPolicy, SpendPolicy};
    use tower_llm_resilience::redis::RedisStore;

    let full = std::env::args().any(|a| a == "--bench");
    let n: u32 = if full { 5_000 } else { 20 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let Some(redis) = redis_server::RedisServer::start("shared_state bench").await else {
            return;
        };
        let bare = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
            let body = r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":10}}"#;
            let resp = http::Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .expect("response");
            Ok::<_, Infallible>(resp)
        });
        let request = || {
            http::Request::post("http://api.example/v1/chat/completions")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#,
                )))
                .expect("request")
        };
        let mut with_spend = Policy::interactive();
        with_spend.store.url = Some(redis.url());
        let mut s = SpendPolicy::default();
        s.cap = 1e9;
        s.default_owner = Some("team".to_owned());
        s.default_price = Some(Price::new(1.0, 1.0));
        with_spend.budget.spend = Some(s);
        let mut with_rate = Policy::interactive();
        with_rate.store.url = Some(redis.url());
        let mut r = RateLimitPolicy::default();
        r.requests_per_second = Some(1e6);
        r.burst = 1_000_000;
        with_rate.budget.rate_limit = Some(r);

        println!("Shared state per request ({n} sequential requests, one replica):");
        println!();
        println!("| setup | store | µs/request | added µs | Redis round trips/request |");
        println!("|---|---|---:|---:|---:|");
        for (name, policy) in [("spend cap", &with_spend), ("rate limit", &with_rate)] {
            let mut base = 0.0;
            for redis_store in [false, true] {
                let store = RedisStore::new(&policy.store).expect("store");
                let mut layer = BudgetLayer::from_policy(policy).expect("layer");
                if redis_store {
                    layer = layer.store(Arc::new(store.clone()) as Arc<dyn BudgetStore>);
                }
                let mut svc = layer.layer(bare);
                // Warm up: connection, scripts loaded.
                for _ in 0..20 {
                    let resp = svc
                        .ready()
                        .await
                        .expect("ready")
                        .call(request())
                        .await
                        .expect("ok");
                    resp.into_body().collect().await.expect("body");
                }
                store.flush().await;
                let calls_before = store.stats().calls;
                let start = Instant::now();
                for _ in 0..n {
                    let resp = svc
                        .ready()
                        .await
                        .expect("ready")
                        .call(request())
                        .await
                        .expect("ok");
                    resp.into_body().collect().await.expect("body");
                }
                // Settlement is off the request path; it is counted once it has happened.
                let elapsed = start.elapsed();
                store.flush().await;
                let per = elapsed.as_secs_f64() * 1e6 / f64::from(n);
                let trips = (store.stats().calls - calls_before) as f64 / f64::from(n);
                if !redis_store {
                    base = per;
                }
                println!(
                    "| {name} | {} | {per:.1} | {:.1} | {trips:.2} |",
                    if redis_store {
                        "Redis (loopback)"
                    } else {
                        "MemoryStore"
                    },
                    per - base
                );
            }
        }
        drop(redis);
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
}
