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
    /// `metadata.uid`, when the file carries one (`kubectl get -o yaml`).
    pub uid: Option<String>,
    /// The spec as written.
    pub spec: BalancedServiceSpec,
}

/// One thing wrong with a file, naming the document and the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{file}: {message}")]
    Read {
        /// The file.
        file: String,
        /// What the OS said.
        message: String,
    },
    /// Not YAML; the message carries the line and column.
    #[error("{0}")]
    Syntax(String),
    /// A document that is not a BalancedService.
    #[error(
        "document {index}: expected apiVersion {API_VERSION} and kind BalancedService, got apiVersion {api_version:?} and kind {kind:?}"
    )]
    NotBalancedService {
        /// 1-based document position.
        index: usize,
        /// Its `apiVersion`.
        api_version: String,
        /// Its `kind`.
        kind: String,
    },
    /// A field of the wrong type or shape.
    #[error("document {index}: {path}: {message}")]
    Shape {
        /// 1-based document position.
        index: usize,
        /// The field, e.g. `spec.listeners[0].port`.
        path: String,
        /// What serde expected and found.
        message: String,
    },
    /// A field the API does not have (a typo would otherwise be ignored).
    #[error("document {index} ({key}): {path}: unknown field")]
    UnknownField {
        /// 1-based document position.
        index: usize,
        /// The document's namespace/name.
        key: ServiceKey,
        /// The field.
        path: String,
    },
    /// Two documents for one namespace/name.
    #[error("document {index} ({key}): the same namespace/name as document {first}")]
    Duplicate {
        /// 1-based document position.
        index: usize,
        /// The namespace/name.
        key: ServiceKey,
        /// The document that had it first.
        first: usize,
    },
    /// The file holds no BalancedService.
    #[error("no BalancedService documents found")]
    Empty,
    /// A field with a value the API does not accept.
    #[error("document {index} ({key}): {error}")]
    Invalid {
        /// 1-based document position.
        index: usize,
        /// The document's namespace/name.
        key: ServiceKey,
        /// The field and why.
        error: FieldError,
    },
}

/// Everything wrong with a file, one line per problem.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct LoadErrors(pub Vec<LoadError>);

impl LoadErrors {
    /// Each problem as the line it prints as.
    pub fn lines(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

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
    #[serde(default)]
    uid: Option<String>,
}

/// Parses every document of a multi-document YAML text.
pub fn parse_documents(text: &str) -> Result<Vec<Document>, LoadErrors> {
    // A YAML syntax error ends the stream: nothing after it can be trusted,
    // and the parser's message names the line and column.
    let values: Vec<serde_json::Value> = serde_saphyr::from_multiple_with_options(text, yaml_options())
        .map_err(|e| LoadErrors(vec![LoadError::Syntax(e.to_string())]))?;
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        if value.is_null() {
            continue;
        }
        match parse_one(i + 1, value) {
            Ok(doc) => docs.push(doc),
            Err(mut errs) => errors.append(&mut errs),
        }
    }
    if docs.is_empty() && errors.is_empty() {
        errors.push(LoadError::Empty);
    }
    let mut seen = std::collections::HashMap::new();
    for doc in &docs {
        if let Some(first) = seen.insert(doc.key.clone(), doc.index) {
            errors.push(LoadError::Duplicate {
                index: doc.index,
                key: doc.key.clone(),
                first,
            });
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(LoadErrors(errors))
    }
}

/// YAML 1.2 as Kubernetes reads it: `yes`, `on` and `0755` stay strings (as
/// they did with serde_yaml), and errors are one line with their position.
fn yaml_options() -> serde_saphyr::Options {
    let mut opts = serde_saphyr::Options::default();
    opts.strict_booleans = true;
    opts.leading_zero_numbers_as_strings = true;
    opts.underscored_numbers_as_strings = true;
    opts.with_snippet = false;
    opts
}

fn parse_one(index: usize, value: serde_json::Value) -> Result<Document, Vec<LoadError>> {
    let header = |k: &str| value.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let (api_version, kind) = (header("apiVersion"), header("kind"));
    if api_version != API_VERSION || kind != "BalancedService" {
        return Err(vec![LoadError::NotBalancedService {
            index,
            api_version,
            kind,
        }]);
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
        vec![LoadError::Shape {
            index,
            path: e.path().to_string(),
            message: e.inner().to_string(),
        }]
    })?;
    let _ = (&raw.api_version, &raw.kind);
    let key = ServiceKey::new(
        raw.metadata.namespace.unwrap_or_else(|| "default".to_string()),
        raw.metadata.name,
    );
    if !unknown.is_empty() {
        return Err(unknown
            .into_iter()
            .map(|path| LoadError::UnknownField {
                index,
                key: key.clone(),
                path,
            })
            .collect());
    }
    Ok(Document {
        index,
        key,
        uid: raw.metadata.uid,
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
            Err(errs) => errors.extend(errs.0.into_iter().map(|error| LoadError::Invalid {
                index: doc.index,
                key: doc.key.clone(),
                error,
            })),
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
        assert_eq!(
            err.lines(),
            vec!["document 1 (shop/web): spec.helthCheck: unknown field"]
        );
    }

    #[test]
    fn type_errors_name_the_field() {
        let text = GOOD.replacen("port: 8080", "port: eighty", 1);
        let err = parse_documents(&text).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert!(
            err.lines()[0].starts_with("document 1: spec.listeners[0].port: invalid type: string \"eighty\""),
            "{err}"
        );
    }

    #[test]
    fn yaml_errors_name_the_line_and_column() {
        let text = GOOD.replacen(
            "listeners: [{name: http, port: 8080}]",
            "listeners: [{name: http, port: 8080}",
            1,
        );
        let err = parse_documents(&text).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        let line = err.to_string();
        assert!(line.contains("at line 7, column 14"), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
    }

    #[test]
    fn yaml_1_1_words_stay_strings() {
        // `yes` as a name and `0755`-like values must not turn into bools or
        // octal numbers on the way to a string field.
        let text = GOOD
            .replacen("name: http", "name: yes", 1)
            .replacen("name: web", "name: \"0755\"", 1);
        let docs = parse_documents(&text).unwrap();
        assert_eq!(docs[0].spec.listeners[0].name, "yes");
        assert_eq!(docs[0].key.name, "0755");
    }

    #[test]
    fn metadata_uid_is_kept() {
        let text = GOOD.replacen(
            "metadata: {name: web, namespace: shop}",
            "metadata: {name: web, namespace: shop, uid: 1234-abcd}",
            1,
        );
        assert_eq!(parse_documents(&text).unwrap()[0].uid.as_deref(), Some("1234-abcd"));
    }

    #[test]
    fn other_kinds_are_refused() {
        let err = parse_documents("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n").unwrap_err();
        assert!(
            err.lines()[0].contains("got apiVersion \"v1\" and kind \"Service\""),
            "{err}"
        );
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
            err.lines(),
            vec!["document 2 (shop/web): the same namespace/name as document 1"]
        );
        assert_eq!(parse_documents("").unwrap_err().0, vec![LoadError::Empty]);
    }

    #[test]
    fn validation_errors_name_document_and_field() {
        let text = GOOD.replacen("port: 8081", "port: 0", 1);
        let err = load_configs(&text).unwrap_err();
        assert_eq!(
            err.lines(),
            vec!["document 1 (shop/web): spec.endpoints[0].port: must be 1..=65535, got 0"]
        );
        match &err.0[0] {
            LoadError::Invalid { index, error, .. } => {
                assert_eq!((*index, error.path.as_str()), (1, "spec.endpoints[0].port"));
            }
            other => panic!("not a field error: {other:?}"),
        }
    }
}
