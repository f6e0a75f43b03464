//! Replays the committed fuzz corpus (`fuzz/corpus/TARGET/*`) through the
//! same functions the fuzz targets run (`balanced::fuzzing`), so every input
//! a fuzzer once found interesting keeps passing without a fuzzer in CI.

type Target = fn(&[u8]);

fn replay(name: &str, target: Target) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| target(&data));
        assert!(outcome.is_ok(), "{} panics on {}", name, path.display());
        n += 1;
    }
    assert!(n > 0, "no corpus for {name} in {}", dir.display());
}

#[test]
fn the_config_corpus_loads_without_panics() {
    replay("config", balanced::fuzzing::config);
}

#[test]
fn the_routes_corpus_matches_without_panics() {
    replay("routes", balanced::fuzzing::routes);
}

#[test]
fn the_agent_corpus_parses_without_panics() {
    replay("agent", balanced::fuzzing::agent);
}

#[test]
fn the_slices_corpus_reads_without_panics() {
    replay("slices", balanced::fuzzing::slices);
}

#[test]
fn the_probe_answer_corpus_parses_without_panics() {
    replay("probe_answer", balanced::fuzzing::probe_answer);
}

#[test]
fn the_client_hello_corpus_parses_without_panics() {
    replay("client_hello", balanced::fuzzing::client_hello);
}

#[test]
fn the_http1_head_corpus_reads_without_panics() {
    replay("http1_head", balanced::fuzzing::http1_head);
}

#[test]
fn the_chunked_corpus_scans_without_panics() {
    replay("chunked", balanced::fuzzing::chunked);
}
