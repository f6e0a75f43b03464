//! `/status` for people and spreadsheets: the same document as the JSON,
//! rendered server-side as one HTML page (a table per service, rows that do
//! not serve standing out, refreshing itself; no script) or as CSV (one row
//! per endpoint), as Tengine's `check_status` offers html, csv and json.

use std::fmt::Write;

use serde_json::Value;

/// How `/status` answers a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The JSON document (the default: scripts and `curl`).
    Json,
    /// An HTML page (`Accept: text/html`, as browsers send, or `?format=html`).
    Html,
    /// CSV, one row per endpoint (`?format=csv`).
    Csv,
}

impl Format {
    /// `?format=` wins; else HTML for a client that asks for it first, else JSON.
    pub fn of(query: Option<&str>, accept: Option<&str>) -> Format {
        let asked = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|p| p.strip_prefix("format="));
        match asked {
            Some("csv") => Format::Csv,
            Some("html") => Format::Html,
            Some(_) => Format::Json,
            None if accept.is_some_and(|a| a.split(',').next().is_some_and(|t| t.trim().starts_with("text/html"))) => {
                Format::Html
            }
            None => Format::Json,
        }
    }
}

/// One endpoint row, read from the JSON document (fields a source does not
/// know are left empty).
struct Row<'a> {
    endpoint: String,
    state: &'a str,
    last_error: &'a str,
    last_change: &'a str,
    weight: String,
    /// The percent of its weight it takes while slow start ramps it up.
    ramp: String,
    in_flight: String,
    ejected: bool,
    draining: bool,
}

impl Row<'_> {
    /// Not taking new traffic: a failed or unknown check, an ejection, a drain.
    fn down(&self) -> bool {
        (!self.state.is_empty() && self.state != "Healthy") || self.ejected || self.draining
    }
}

fn rows(service: &Value) -> Vec<Row<'_>> {
    let text = |v: &Value, k: &str| -> String {
        match &v[k] {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    };
    service["endpoints"]
        .as_array()
        .map(|eps| {
            eps.iter()
                .map(|e| {
                    let address = e["address"].as_str().unwrap_or("");
                    let endpoint = if address.contains(':') {
                        format!("[{address}]:{}", text(e, "port"))
                    } else {
                        format!("{address}:{}", text(e, "port"))
                    };
                    Row {
                        endpoint,
                        state: e["state"].as_str().unwrap_or(""),
                        last_error: e["lastError"].as_str().unwrap_or(""),
                        last_change: e["lastTransitionTime"].as_str().unwrap_or(""),
                        weight: e["weightPercent"].as_u64().map(|w| format!("{w}%")).unwrap_or_default(),
                        ramp: text(e, "slowStartPercent"),
                        in_flight: text(e, "activeConnections"),
                        ejected: e["ejected"].as_bool().unwrap_or(false),
                        draining: e["draining"].as_bool().unwrap_or(false),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

fn service_name(service: &Value) -> String {
    format!(
        "{}/{}",
        service["namespace"].as_str().unwrap_or(""),
        service["name"].as_str().unwrap_or("")
    )
}

fn services(doc: &Value) -> &[Value] {
    doc["services"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The document as CSV (RFC 4180), one row per endpoint.
pub fn csv(doc: &Value) -> String {
    let mut out = String::from(
        "service,endpoint,state,last_error,last_change,weight_percent,in_flight,ejected,draining,slow_start_percent\r\n",
    );
    for service in services(doc) {
        let name = service_name(service);
        for r in rows(service) {
            let fields = [
                name.as_str(),
                &r.endpoint,
                r.state,
                r.last_error,
                r.last_change,
                r.weight.trim_end_matches('%'),
                &r.in_flight,
                if r.ejected { "true" } else { "false" },
                if r.draining { "true" } else { "false" },
                &r.ramp,
            ];
            let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
            out.push_str(&line.join(","));
            out.push_str("\r\n");
        }
    }
    out
}

fn csv_field(f: &str) -> String {
    if f.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f.to_string()
    }
}

/// The document as one HTML page that refreshes itself every `refresh` seconds.
pub fn html(doc: &Value, refresh: u32) -> String {
    let mut out = String::with_capacity(4096);
    let all = services(doc);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{refresh}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>balanced: status</title><style>{STYLE}</style></head><body>\
         <h1>balanced</h1><p class=\"meta\">{} service{}; refreshes every {refresh} s. \
         <a href=\"?format=json\">JSON</a> · <a href=\"?format=csv\">CSV</a></p>",
        all.len(),
        if all.len() == 1 { "" } else { "s" }
    );
    for (key, label) in [("lastRejected", "Rejected"), ("watchError", "Watch error")] {
        if let Some(why) = doc[key].as_str().filter(|w| !w.is_empty()) {
            let _ = write!(out, "<p class=\"warn\">{label}: {}</p>", escape(why));
        }
    }
    if doc["leader"] == Value::Bool(false) {
        out.push_str("<p class=\"warn\">This controller is standing by: the leader has the table.</p>");
    }
    for service in all {
        let rows = rows(service);
        let serving = rows.iter().filter(|r| !r.down()).count();
        let _ = write!(
            out,
            "<h2>{}</h2><p class=\"meta\">{serving}/{} serving",
            escape(&service_name(service)),
            rows.len()
        );
        if let (Some(f), Some(w)) = (
            service["requestsInFlight"].as_u64(),
            service["requestsWaiting"].as_u64(),
        ) {
            let _ = write!(out, "; {f} requests in flight, {w} waiting");
        }
        out.push_str(
            "</p><table><thead><tr><th>endpoint</th><th>state</th><th>last error</th>\
             <th>last change</th><th>weight</th><th>in flight</th><th>ejected</th></tr></thead><tbody>",
        );
        for r in &rows {
            let mut state = if r.state.is_empty() { "-" } else { r.state }.to_string();
            if r.draining {
                state.push_str(" (draining)");
            }
            let weight = if r.ramp.is_empty() {
                r.weight.clone()
            } else {
                format!("{} (slow start: {}%)", r.weight, r.ramp)
            };
            let _ = write!(
                out,
                "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                if r.down() { "down" } else { "up" },
                escape(&r.endpoint),
                escape(&state),
                escape(r.last_error),
                escape(r.last_change),
                escape(&weight),
                escape(&r.in_flight),
                if r.ejected { "ejected" } else { "" }
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</body></html>\n");
    out
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em;margin:0}h2{font-size:1.1em;margin:1.4em 0 .2em}\
.meta{color:#666;margin:.2em 0 .6em}.warn{background:#fff3cd;padding:.4em .6em}\
table{border-collapse:collapse;min-width:50%}th,td{text-align:left;padding:.25em .7em;border-bottom:1px solid #ddd}\
th{background:#f3f3f3}tr.down td{background:#fde2e1;color:#8a1c14;font-weight:600}";

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        serde_json::json!({
            "services": [{
                "namespace": "default", "name": "web", "requestsInFlight": 3, "requestsWaiting": 0,
                "endpoints": [
                    {"address": "10.0.0.1", "port": 8080, "state": "Healthy", "lastError": null,
                     "lastTransitionTime": "2026-11-30T10:00:00Z", "activeConnections": 2,
                     "ejected": false, "weightPercent": 100, "draining": false},
                    {"address": "10.0.0.2", "port": 8080, "state": "Unhealthy",
                     "lastError": "connect: Connection refused (os error 111), \"<b>\"",
                     "lastTransitionTime": "2026-11-30T10:01:00Z", "activeConnections": 0,
                     "ejected": true, "weightPercent": 100, "draining": false},
                ]
            }],
            "lastRejected": "spec.healthCheck.rise: must be >= 1, got 0"
        })
    }

    #[test]
    fn a_browser_gets_html_a_query_picks_and_everything_else_gets_json() {
        let chrome = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert_eq!(Format::of(None, Some(chrome)), Format::Html);
        assert_eq!(Format::of(None, Some("*/*")), Format::Json, "curl");
        assert_eq!(Format::of(None, None), Format::Json);
        assert_eq!(Format::of(Some("format=csv"), Some(chrome)), Format::Csv);
        assert_eq!(Format::of(Some("x=1&format=json"), Some(chrome)), Format::Json);
        assert_eq!(Format::of(Some("format=html"), None), Format::Html);
    }

    #[test]
    fn the_page_marks_what_does_not_serve_and_escapes_what_it_shows() {
        let page = html(&doc(), 5);
        assert!(page.starts_with("<!doctype html>"));
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        assert!(page.contains("<h2>default/web</h2>"));
        assert!(page.contains("1/2 serving; 3 requests in flight, 0 waiting"));
        assert_eq!(page.matches("<tr class=\"down\">").count(), 1);
        assert!(page.contains("&quot;&lt;b&gt;&quot;"), "error text is escaped");
        assert!(!page.contains("<b>"));
        assert!(page.contains("Rejected: spec.healthCheck.rise: must be &gt;= 1, got 0"));
        assert!(!page.contains("<script"), "no script");
    }

    #[test]
    fn csv_has_one_quoted_row_per_endpoint() {
        let text = csv(&doc());
        let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("service,endpoint,state,"));
        assert_eq!(
            lines[1],
            "default/web,10.0.0.1:8080,Healthy,,2026-11-30T10:00:00Z,100,2,false,false,"
        );
        assert_eq!(
            lines[2],
            "default/web,10.0.0.2:8080,Unhealthy,\"connect: Connection refused (os error 111), \"\"<b>\"\"\",2026-11-30T10:01:00Z,100,0,true,false,"
        );
    }
}
