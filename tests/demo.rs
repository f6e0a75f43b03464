//! `balanced demo` does what the README promises: no client errors, the kill
//! noticed, the revival confirmed, the slow backend given the smallest share.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_hides_a_killed_backend_from_clients() {
    let s = balanced::demo::run_with(balanced::demo::Timeline::quick())
        .await
        .expect("demo runs");
    assert_eq!(s.errors, 0, "{s:?}");
    assert!(s.detect.is_some() && s.recover.is_some(), "{s:?}");
    let share = |name: &str| s.per_backend.get(name).copied().unwrap_or(0);
    assert!(share("c-slow") < share("a"), "{s:?}");
    assert!(share("b") > 0, "{s:?}");
}
