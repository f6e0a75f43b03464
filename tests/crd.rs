//! `crds/` holds exactly what `balanced crd` prints.

#[test]
fn crds_directory_matches_the_generated_crd() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/balancedservices.balanced.dev.yaml");
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    let generated = balanced::api::crd_yaml();
    if on_disk != generated {
        if std::env::var_os("BALANCED_BLESS").is_some() {
            std::fs::write(path, &generated).unwrap();
            return;
        }
        panic!("{path} is out of date: run `BALANCED_BLESS=1 cargo test --test crd` (or `cargo run -- crd > {path}`)");
    }
}

#[test]
fn examples_parse_and_validate() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let result = if path.file_name().unwrap().to_string_lossy().starts_with("standalone") {
                balanced::source::file::configs_from_text(&text).map(|_| ())
            } else {
                balanced::api::load_configs(&text).map(|_| ())
            };
            if let Err(e) = result {
                panic!("{}: {e}", path.display());
            }
            seen += 1;
        }
    }
    assert!(seen > 0, "no examples found");
}
