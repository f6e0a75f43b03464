//! Reading BalancedService documents from YAML, as `kubectl apply -f` takes them.
//!
//! Files are stricter than the API server: a misspelt field (`helthCheck`) is an
//! error here, because nothing would prune it and nobody would notice it was ignored.

use serde::Deserialize;

use super::config::{Config, ServiceKey};
use super::spec::BalancedServiceSpec;
use super::validate::{FieldError, validate};

/// The `apiVersion` BalancedService documents carry.
pub const API_VERSION: &str = "balanced.dev/v1alpha1";

/// A BalancedService read from a file, before validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// 1-based position in the file.
    pub index: usize,
    /// `metadata.namespace` (default `default`) and `metadata.name`.
    pub key: ServiceKey,
    /// The spec as written.
    pub spec: BalancedServiceSpec,
}

/// Everything wrong with a file, each line naming the document and the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}", .0.join("\n"))]
pub struct LoadErrors(pub Vec<String>);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDocument {
    api_version: String,
    kind: String,
    metadata: RawMetadata,
    spec: BalancedServiceSpec,
    // Files exported with `kubectl get -o yaml` carry status: accepted and ignored.
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct RawMetadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// Parses every document of a multi-document YAML text.
pub fn parse_documents(text: &str) -> Result<Vec<Document>, LoadErrors> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("document {index}: {e}"));
                // A YAML syntax error ends the stream: nothing after it can be trusted.
                break;
            }
        };
        match parse_one(index, value) {
            Ok(doc) => docs.push(doc),
            Err(mut errs) => errors.append(&mut errs),
        }
    }
    if docs.is_empty() && errors.is_empty() {
        errors.push("no BalancedService documents found".to_string());
    }
    let mut seen = std::collections::HashMap::new();
    for doc in &docs {
        if let Some(first) = seen.insert(doc.key.clone(), doc.index) {
            errors.push(format!(
                "document {} ({}): the same namespace/name as document {first}",
                doc.index, doc.key
            ));
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(LoadErrors(errors))
    }
}

fn parse_one(index: usize, value: serde_yaml::Value) -> Result<Document, Vec<String>> {
    let header = |v: &serde_yaml::Value, k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let (api_version, kind) = (header(&value, "apiVersion"), header(&value, "kind"));
    if api_version != API_VERSION || kind != "BalancedService" {
        return Err(vec![format!(
            "document {index}: expected apiVersion {API_VERSION} and kind BalancedService, got apiVersion {api_version:?} and kind {kind:?}"
        )]);
    }
    let mut unknown = Vec::new();
    let mut note_unknown = |path: serde_ignored::Path<'_>| {
        let path = field_path(&path);
        if path.starts_with("spec") {
            unknown.push(path);
        }
    };
    let de = serde_ignored::Deserializer::new(value, &mut note_unknown);
    let raw: RawDocument = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        vec![format!("document {index}: {path}: {}", e.inner())]
    })?;
    let _ = (&raw.api_version, &raw.kind);
    let key = ServiceKey::new(
        raw.metadata.namespace.unwrap_or_else(|| "default".to_string()),
        raw.metadata.name,
    );
    if !unknown.is_empty() {
        return Err(unknown
            .into_iter()
            .map(|p| format!("document {index} ({key}): {p}: unknown field"))
            .collect());
    }
    Ok(Document {
        index,
        key,
        spec: raw.spec,
    })
}

/// Formats serde_ignored's path the way our errors name fields: `spec.listeners[0].nmae`.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => {
            let p = field_path(parent);
            if p.is_empty() {
                key.to_string()
            } else {
                format!("{p}.{key}")
            }
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// Parses and validates every document; all errors of all documents, or all configs.
pub fn load_configs(text: &str) -> Result<Vec<Config>, LoadErrors> {
    let docs = parse_documents(text)?;
    let mut configs = Vec::with_capacity(docs.len());
    let mut errors = Vec::new();
    for doc in docs {
        match validate(doc.key.clone(), &doc.spec) {
            Ok(cfg) => configs.push(cfg),
            Err(errs) => errors.extend(
                errs.0
                    .iter()
                    .map(|e: &FieldError| format!("document {} ({}): {e}", doc.index, doc.key)),
            ),
        }
    }
    if errors.is_empty() {
        Ok(configs)
    } else {
        Err(LoadErrors(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: web, namespace: shop}
spec:
  endpoints: [{address: 127.0.0.1, port: 8081}]
  listeners: [{name: http, port: 8080}]
---
apiVersion: balanced.dev/v1alpha1
kind: BalancedService
metadata: {name: api}
spec:
  endpoints: [{address: 127.0.0.1, port: 9091}]
  listeners: [{name: tcp, port: 9090, protocol: TCP}]
---
";

    #[test]
    fn reads_every_document_and_defaults_the_namespace() {
        let docs = parse_documents(GOOD).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].key, ServiceKey::new("shop", "web"));
        assert_eq!(docs[1].key, ServiceKey::new("default", "api"));
    }

    #[test]
    fn unknown_spec_fields_are_errors() {
        let text = GOOD.replacen("listeners:", "helthCheck: {rise: 2}\n  listeners:", 1);
        let err = parse_documents(&text).unwrap_err();
        assert_eq!(err.0, vec!["document 1 (shop/web): spec.helthCheck: unknown field"]);
    }

    #[test]
    fn type_errors_name_the_field() {
        let text = GOOD.replacen("port: 8080", "port: eighty", 1);
        let err = parse_documents(&text).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert!(
            err.0[0].starts_with("document 1: spec.listeners[0].port: invalid type: string \"eighty\""),
            "{err}"
        );
    }

    #[test]
    fn other_kinds_are_refused() {
        let err = parse_documents("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n").unwrap_err();
        assert!(err.0[0].contains("got apiVersion \"v1\" and kind \"Service\""), "{err}");
    }

    #[test]
    fn duplicates_and_empty_files_are_refused() {
        let twice = format!(
            "{}\n---\n{}",
            &GOOD[..GOOD.find("---").unwrap()],
            &GOOD[..GOOD.find("---").unwrap()]
        );
        let err = parse_documents(&twice).unwrap_err();
        assert_eq!(
            err.0,
            vec!["document 2 (shop/web): the same namespace/name as document 1"]
        );
        assert_eq!(
            parse_documents("").unwrap_err().0,
            vec!["no BalancedService documents found"]
        );
    }

    #[test]
    fn validation_errors_name_document_and_field() {
        let text = GOOD.replacen("port: 8081", "port: 0", 1);
        let err = load_configs(&text).unwrap_err();
        assert_eq!(
            err.0,
            vec!["document 1 (shop/web): spec.endpoints[0].port: must be 1..=65535, got 0"]
        );
    }
}
