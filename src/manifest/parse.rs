//! Parsing `projectors.toml` into the [`Manifest`] model.
//!
//! The TOML is read into toml's spanned tree rather than straight into serde
//! structs, so that one pass finds every problem (unknown keys, wrong types,
//! bad modes, bad placeholders, cycles in `after`) and each keeps its span.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use super::sql_text;
use super::{
    Check, Handler, Manifest, ManifestError, Mode, OnError, Problem, Projector, Rebuild, Span,
    Store, valid_name,
};

type Value<'i> = Spanned<DeValue<'i>>;
type Key<'i> = Spanned<DeString<'i>>;

const TOP_KEYS: &[&str] = &["store", "ledger", "alert", "projectors"];
const STORE_KEYS: &[&str] = &[
    "table",
    "position",
    "type",
    "data",
    "stream",
    "time",
    "metadata",
    "transaction",
    "notify",
    "filter",
];
const PROJECTOR_KEYS: &[&str] = &[
    "mode",
    "tables",
    "side_effects",
    "version",
    "after",
    "on",
    "command",
    "events",
    "check",
    "reset",
    "on_error",
    "max_retries",
    "ack_timeout",
    "rebuild",
    "prepare",
    "partitions",
    "partition_by",
];
/// The most partitions a projector may have (each is a connection while it boots and plays).
const MAX_PARTITIONS: i64 = 64;
const CHECK_KEYS: &[&str] = &["name", "projection", "events"];

pub(super) fn parse(path: &Path, source: String) -> Result<Manifest, ManifestError> {
    let (root, syntax) = DeTable::parse_recoverable(&source);
    if !syntax.is_empty() {
        let problems = syntax
            .iter()
            .map(|e| {
                let span = e.span().unwrap_or(0..0);
                Problem::new(span, "invalid TOML", e.message().trim().to_string())
            })
            .collect();
        return Err(ManifestError::new(path, &source, problems));
    }
    let mut w = Walker {
        source: &source,
        problems: Vec::new(),
    };
    let root_span = root.span();
    let root = root.get_ref();
    w.check_keys(root, TOP_KEYS, "the manifest");

    let store = match get(root, "store") {
        Some((_, v)) => w.table(v, "[store]").map(|t| w.store(t, v.span())),
        None => {
            w.problems.push(
                Problem::new(
                    root_span.start..root_span.start,
                    "the manifest has no [store] section",
                    "expected [store] here",
                )
                .help("add [store] with table, position, type and data: the events table and its columns"),
            );
            None
        }
    };

    let mut schemas = Schemas::default();
    if let Some((_, v)) = get(root, "ledger")
        && let Some(t) = w.table(v, "[ledger]")
    {
        w.check_keys(
            t,
            &["schema", "build_schema", "previous_schema"],
            "[ledger]",
        );
        for (key, slot) in [
            ("schema", &mut schemas.ledger),
            ("build_schema", &mut schemas.build),
            ("previous_schema", &mut schemas.previous),
        ] {
            if let Some((_, s)) = get(t, key)
                && let Some(name) = w.string(s, &format!("ledger.{key}"))
            {
                if valid_name(&name) {
                    *slot = name;
                } else {
                    w.problems.push(Problem::new(
                        s.span(),
                        format!("ledger.{key} must be lowercase letters, digits and underscores"),
                        "not a valid schema name",
                    ));
                }
            }
        }
    }

    let mut alert = None;
    if let Some((_, v)) = get(root, "alert")
        && let Some(t) = w.table(v, "[alert]")
    {
        w.check_keys(t, &["command"], "[alert]");
        if let Some((_, c)) = get(t, "command") {
            alert = w.command(c, "alert.command");
        }
    }

    let mut projectors = Vec::new();
    match get(root, "projectors") {
        Some((_, v)) => {
            if let Some(t) = w.table(v, "[projectors]") {
                for (key, value) in t.iter() {
                    if let Some(p) = w.projector(key, value) {
                        projectors.push(p);
                    }
                }
            }
        }
        None => w.problems.push(
            Problem::new(
                root_span.start..root_span.start,
                "the manifest defines no projectors",
                "expected [projectors.NAME] sections",
            )
            .help("add a projector, e.g. [projectors.band] with on.BandCreated = \"INSERT …\""),
        ),
    }
    w.check_after(&projectors);

    match (store, w.problems.is_empty()) {
        (Some(store), true) => Ok(Manifest {
            path: path.to_path_buf(),
            source: source.clone(),
            store,
            ledger_schema: schemas.ledger,
            build_schema: schemas.build,
            previous_schema: schemas.previous,
            alert,
            projectors,
        }),
        _ => Err(ManifestError::new(path, &source, w.problems)),
    }
}

/// The schemas of `[ledger]`.
struct Schemas {
    ledger: String,
    build: String,
    previous: String,
}

impl Default for Schemas {
    fn default() -> Self {
        Schemas {
            ledger: super::DEFAULT_LEDGER_SCHEMA.into(),
            build: "projectionist_build".into(),
            previous: "projectionist_previous".into(),
        }
    }
}

fn get<'a, 'i>(t: &'a DeTable<'i>, key: &str) -> Option<(&'a Key<'i>, &'a Value<'i>)> {
    t.iter().find(|(k, _)| k.get_ref().as_ref() == key)
}

fn type_name(v: &DeValue) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

struct Walker<'s> {
    source: &'s str,
    problems: Vec<Problem>,
}

impl<'s> Walker<'s> {
    fn wrong_type(&mut self, v: &Value, what: &str, expected: &str) {
        self.problems.push(Problem::new(
            v.span(),
            format!("{what} must be {expected}"),
            format!("this is {}", type_name(v.get_ref())),
        ));
    }

    fn check_keys(&mut self, t: &DeTable, allowed: &[&str], context: &str) {
        for (k, _) in t.iter() {
            let name = k.get_ref().as_ref();
            if !allowed.contains(&name) {
                self.problems.push(
                    Problem::new(
                        k.span(),
                        format!("unknown key `{name}` in {context}"),
                        "unknown key",
                    )
                    .help(format!("expected one of: {}", allowed.join(", "))),
                );
            }
        }
    }

    fn table<'a, 'i>(&mut self, v: &'a Value<'i>, what: &str) -> Option<&'a DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.wrong_type(v, what, "a table");
                None
            }
        }
    }

    fn string(&mut self, v: &Value, what: &str) -> Option<String> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            _ => {
                self.wrong_type(v, what, "a string");
                None
            }
        }
    }

    fn boolean(&mut self, v: &Value, what: &str) -> Option<bool> {
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(v, what, "true or false");
                None
            }
        }
    }

    fn integer(&mut self, v: &Value, what: &str, min: i64, max: i64) -> Option<i64> {
        let parsed = match v.get_ref() {
            DeValue::Integer(i) => {
                let text = i.as_str().replace('_', "");
                let digits = text
                    .trim_start_matches("0x")
                    .trim_start_matches("0o")
                    .trim_start_matches("0b");
                i64::from_str_radix(digits, i.radix()).ok()
            }
            _ => {
                self.wrong_type(v, what, "an integer");
                return None;
            }
        };
        match parsed {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.problems.push(Problem::new(
                    v.span(),
                    format!("{what} must be between {min} and {max}"),
                    "out of range",
                ));
                None
            }
        }
    }

    fn strings(&mut self, v: &Value, what: &str) -> Option<Vec<(String, Span)>> {
        match v.get_ref() {
            DeValue::Array(items) => {
                let mut out = Vec::new();
                for item in items.iter() {
                    match item.get_ref() {
                        DeValue::String(s) => out.push((s.to_string(), item.span())),
                        _ => self.wrong_type(item, &format!("each item of {what}"), "a string"),
                    }
                }
                Some(out)
            }
            _ => {
                self.wrong_type(v, what, "an array of strings");
                None
            }
        }
    }

    fn command(&mut self, v: &Value, what: &str) -> Option<Vec<String>> {
        let argv: Vec<String> = self.strings(v, what)?.into_iter().map(|s| s.0).collect();
        if argv.is_empty() || argv[0].is_empty() {
            self.problems.push(
                Problem::new(v.span(), format!("{what} is empty"), "no program to run")
                    .help("write the program and its arguments, e.g. [\"python3\", \"examples/welcome_email.py\"]"),
            );
            return None;
        }
        Some(argv)
    }

    fn store(&mut self, t: &DeTable, span: Span) -> Store {
        self.check_keys(t, STORE_KEYS, "[store]");
        let mut spans = std::collections::BTreeMap::new();
        let mut value = |w: &mut Self, key: &'static str, required: bool| -> Option<String> {
            match get(t, key) {
                Some((_, v)) => {
                    spans.insert(key, v.span());
                    let s = w.string(v, &format!("store.{key}"))?;
                    if s.trim().is_empty() {
                        w.problems.push(Problem::new(
                            v.span(),
                            format!("store.{key} is empty"),
                            "expected a column name",
                        ));
                        return None;
                    }
                    Some(s)
                }
                None if required => {
                    w.problems.push(
                        Problem::new(
                            span.start..span.start,
                            format!("[store] needs `{key}`"),
                            format!("`{key}` is missing"),
                        )
                        .help(format!(
                            "the events table and its columns: table, position, type, data (missing: {key})"
                        )),
                    );
                    None
                }
                None => None,
            }
        };
        let table = value(self, "table", true).unwrap_or_default();
        let position = value(self, "position", true).unwrap_or_default();
        let event_type = value(self, "type", true).unwrap_or_default();
        let data = value(self, "data", true).unwrap_or_default();
        let stream = value(self, "stream", false);
        let time = value(self, "time", false);
        let metadata = value(self, "metadata", false);
        let transaction = value(self, "transaction", false);
        let notify = value(self, "notify", false);
        let filter = value(self, "filter", false);
        Store {
            table,
            position,
            event_type,
            data,
            stream,
            time,
            metadata,
            transaction,
            notify,
            filter,
            span,
            spans,
        }
    }

    fn projector(&mut self, key: &Key, value: &Value) -> Option<Projector> {
        let name = key.get_ref().to_string();
        let before = self.problems.len();
        if !valid_name(&name) {
            self.problems.push(
                Problem::new(
                    key.span(),
                    format!("projector name `{name}` is not valid"),
                    "not a valid projector name",
                )
                .help("projector names are 1 to 48 lowercase letters, digits and underscores (they name migrations, metrics and locks)"),
            );
        }
        let t = self.table(value, &format!("projectors.{name}"))?;
        let ctx = format!("[projectors.{name}]");
        self.check_keys(t, PROJECTOR_KEYS, &ctx);

        let mut p = Projector {
            name: name.clone(),
            mode: Mode::FromBeginning,
            tables: Vec::new(),
            side_effects: false,
            version: 1,
            after: Vec::new(),
            after_spans: Vec::new(),
            handlers: Vec::new(),
            command: None,
            events: None,
            checks: Vec::new(),
            reset: None,
            rebuild: Rebuild::Swap,
            prepare: None,
            partitions: 1,
            partitions_span: None,
            on_error: OnError::Stop,
            max_retries: 5,
            ack_timeout: Duration::from_secs(30),
            span: key.span(),
        };
        let mut after_spans = Vec::new();
        for (k, v) in t.iter() {
            self.projector_key(&mut p, k, v, &mut after_spans);
        }
        let has_on = get(t, "on").is_some();
        match (has_on, p.command.is_some() || get(t, "command").is_some()) {
            (false, false) => self.problems.push(
                Problem::new(
                    key.span(),
                    format!("projector `{name}` has neither `on` handlers nor a `command`"),
                    "nothing to run",
                )
                .help(format!(
                    "add SQL handlers (on.EventType = \"INSERT …\") or a command ([\"python3\", \"my_projector.py\"]) under [projectors.{name}]"
                )),
            ),
            (true, true) => self.problems.push(
                Problem::new(
                    key.span(),
                    format!("projector `{name}` has both `on` handlers and a `command`"),
                    "one or the other",
                )
                .help("split it into two projectors"),
            ),
            _ => {}
        }
        if has_on && p.events.is_some() {
            let span = get(t, "events")
                .map(|(k, _)| k.span())
                .unwrap_or(key.span());
            self.problems.push(
                Problem::new(
                    span,
                    "`events` is for command projectors",
                    "not used with `on`",
                )
                .help("an SQL projector receives the event types of its `on` handlers"),
            );
        }
        p.after_spans = after_spans.clone();
        for (dep, span) in p.after.iter().zip(after_spans) {
            if dep == &name {
                self.problems.push(Problem::new(
                    span,
                    format!("projector `{name}` cannot come after itself"),
                    "itself",
                ));
            }
        }
        (self.problems.len() == before).then_some(p)
    }

    /// One key of a projector's table.
    fn projector_key(
        &mut self,
        p: &mut Projector,
        k: &Key,
        v: &Value,
        after_spans: &mut Vec<Span>,
    ) {
        let name = p.name.clone();
        let what = format!("projectors.{name}.{}", k.get_ref());
        match k.get_ref().as_ref() {
            "mode" => {
                if let Some(m) = self.string(v, &what) {
                    match Mode::parse(&m) {
                        Some(mode) => p.mode = mode,
                        None => self.problems.push(
                            Problem::new(
                                v.span(),
                                format!("unknown mode `{m}` for projector `{name}`"),
                                "unknown mode",
                            )
                            .help("mode is one of: from_beginning, from_now, once"),
                        ),
                    }
                }
            }
            "tables" => {
                if let Some(list) = self.strings(v, &what) {
                    p.tables = list.into_iter().map(|s| s.0).collect();
                }
            }
            "side_effects" => p.side_effects = self.boolean(v, &what).unwrap_or(false),
            "version" => p.version = self.integer(v, &what, 1, i32::MAX as i64).unwrap_or(1) as i32,
            "after" => {
                if let Some(list) = self.strings(v, &what) {
                    for (dep, span) in list {
                        p.after.push(dep);
                        after_spans.push(span);
                    }
                }
            }
            "on" => {
                if let Some(on) = self.table(v, &what) {
                    for (event, sql) in on.iter() {
                        if let Some(h) = self.handler(&name, event, sql) {
                            p.handlers.push(h);
                        }
                    }
                }
            }
            "command" => p.command = self.command(v, &what),
            "events" => {
                p.events = self
                    .strings(v, &what)
                    .map(|l| l.into_iter().map(|s| s.0).collect())
            }
            "check" => p.checks = self.checks(v, &name),
            "reset" => p.reset = self.string(v, &what),
            "prepare" => p.prepare = self.string(v, &what),
            "rebuild" => {
                if let Some(r) = self.string(v, &what) {
                    match r.as_str() {
                        "swap" => p.rebuild = Rebuild::Swap,
                        "in_place" => p.rebuild = Rebuild::InPlace,
                        other => self.problems.push(
                            Problem::new(
                                v.span(),
                                format!("unknown rebuild `{other}` for projector `{name}`"),
                                "unknown rebuild",
                            )
                            .help("rebuild is swap (build beside the live tables, then swap them in: the default) or in_place (empty the tables and replay)"),
                        ),
                    }
                }
            }
            "on_error" => {
                if let Some(s) = self.string(v, &what) {
                    match s.as_str() {
                        "stop" => p.on_error = OnError::Stop,
                        "retry" => p.on_error = OnError::Retry,
                        "skip" => p.on_error = OnError::Skip,
                        other => self.problems.push(
                            Problem::new(
                                v.span(),
                                format!("unknown on_error `{other}`"),
                                "unknown policy",
                            )
                            .help("on_error is one of: stop, retry, skip"),
                        ),
                    }
                }
            }
            "max_retries" => p.max_retries = self.integer(v, &what, 0, 1000).unwrap_or(5) as u32,
            "partitions" => {
                p.partitions = self.integer(v, &what, 1, MAX_PARTITIONS).unwrap_or(1) as i32;
                p.partitions_span = Some(v.span());
            }
            "partition_by" => {
                if let Some(by) = self.string(v, &what)
                    && by != "stream"
                {
                    self.problems.push(
                        Problem::new(
                            v.span(),
                            format!("unknown partition_by `{by}` for projector `{name}`"),
                            "unknown partition_by",
                        )
                        .help("partition_by is \"stream\" (a hash of the event's stream), the only kind for now"),
                    );
                }
            }
            "ack_timeout" => {
                if let Some(d) = self.duration(v, &what) {
                    p.ack_timeout = d;
                }
            }
            _ => {} // reported by check_keys
        }
    }

    fn duration(&mut self, v: &Value, what: &str) -> Option<Duration> {
        match v.get_ref() {
            DeValue::Integer(_) => self
                .integer(v, what, 1, 86_400)
                .map(|s| Duration::from_secs(s as u64)),
            DeValue::String(s) => match humantime::parse_duration(s) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.problems.push(Problem::new(
                        v.span(),
                        format!("{what} is not a duration: {e}"),
                        "expected e.g. \"30s\" or \"2m\"",
                    ));
                    None
                }
            },
            _ => {
                self.wrong_type(v, what, "a duration such as \"30s\"");
                None
            }
        }
    }

    fn handler(&mut self, projector: &str, event: &Key, v: &Value) -> Option<Handler> {
        let event_type = event.get_ref().to_string();
        let what = format!("projectors.{projector}.on.{event_type}");
        let texts: Vec<(String, Span)> = match v.get_ref() {
            DeValue::String(s) => vec![(s.to_string(), v.span())],
            DeValue::Array(_) => self.strings(v, &what)?,
            _ => {
                self.wrong_type(v, &what, "an SQL string or an array of them");
                return None;
            }
        };
        let mut statements = Vec::new();
        let mut ok = true;
        for (sql, span) in texts {
            match sql_text::parse(&sql) {
                Ok(s) if s.is_empty() => {
                    ok = false;
                    self.problems.push(Problem::new(
                        span,
                        format!("the handler of `{projector}` for {event_type} is empty"),
                        "no SQL here",
                    ));
                }
                Ok(s) => statements.extend(s),
                Err(bad) => {
                    ok = false;
                    for b in bad {
                        let at = self.span_in_string(&span, &sql, b.offset, b.text.len());
                        self.problems.push(
                            Problem::new(
                                at,
                                format!(
                                    "unknown placeholder `{}` in the handler of projector `{projector}` for event {event_type}",
                                    b.text
                                ),
                                "unknown placeholder",
                            )
                            .help(b.why),
                        );
                    }
                }
            }
        }
        ok.then_some(Handler {
            event_type,
            statements,
            span: v.span(),
        })
    }

    /// Maps an offset in a string's value to the file, when the literal has no escapes.
    fn span_in_string(&self, literal: &Span, value: &str, offset: usize, len: usize) -> Span {
        let raw = &self.source[literal.clone()];
        let quote = if raw.starts_with("\"\"\"") || raw.starts_with("'''") {
            3
        } else {
            1
        };
        let mut start = literal.start + quote;
        if quote == 3 {
            if self.source[start..].starts_with("\r\n") {
                start += 2;
            } else if self.source[start..].starts_with('\n') {
                start += 1;
            }
        }
        match self.source.get(start..start + value.len()) {
            Some(text) if text == value => start + offset..start + offset + len,
            _ => literal.clone(),
        }
    }

    fn checks(&mut self, v: &Value, projector: &str) -> Vec<Check> {
        let items = match v.get_ref() {
            DeValue::Array(items) => items,
            _ => {
                self.wrong_type(
                    v,
                    &format!("projectors.{projector}.check"),
                    "an array of tables ([[projectors.NAME.check]])",
                );
                return Vec::new();
            }
        };
        let mut checks = Vec::new();
        for item in items.iter() {
            let Some(t) = self.table(item, &format!("each projectors.{projector}.check")) else {
                continue;
            };
            self.check_keys(t, CHECK_KEYS, &format!("[[projectors.{projector}.check]]"));
            let field = |w: &mut Self, key: &str| match get(t, key) {
                Some((_, v)) => w.string(v, &format!("check.{key}")),
                None => {
                    w.problems.push(Problem::new(
                        item.span(),
                        format!("a check of projector `{projector}` needs `{key}`"),
                        format!("`{key}` is missing"),
                    ).help("a check has a name and two queries, `projection` and `events`, that must return the same rows"));
                    None
                }
            };
            let (name, projection, events) = (
                field(self, "name"),
                field(self, "projection"),
                field(self, "events"),
            );
            if let (Some(name), Some(projection), Some(events)) = (name, projection, events) {
                checks.push(Check {
                    name,
                    projection,
                    events,
                    span: item.span(),
                });
            }
        }
        checks
    }

    /// `after`: known names, no cycles, and modes under which it can be honoured.
    fn check_after(&mut self, projectors: &[Projector]) {
        let by_name: BTreeMap<&str, &Projector> =
            projectors.iter().map(|p| (p.name.as_str(), p)).collect();
        for p in projectors {
            for (i, dep) in p.after.iter().enumerate() {
                let at = p.after_spans.get(i).cloned().unwrap_or(p.span.clone());
                let Some(d) = by_name.get(dep.as_str()) else {
                    if dep != &p.name {
                        self.problems.push(
                            Problem::new(
                                at,
                                format!("projector `{}` comes after `{dep}`, which is not in the manifest", p.name),
                                format!("after = [\"{dep}\"]"),
                            )
                            .help(format!("known projectors: {}", by_name.keys().copied().collect::<Vec<_>>().join(", "))),
                        );
                    }
                    continue;
                };
                let honourable = match d.mode {
                    Mode::FromBeginning => true,
                    Mode::FromNow => p.mode == Mode::FromNow,
                    Mode::Once => p.mode == Mode::Once,
                };
                if !honourable {
                    self.problems.push(
                        Problem::new(
                            p.span.clone(),
                            format!(
                                "projector `{}` ({}) cannot come after `{dep}` ({})",
                                p.name,
                                p.mode.as_str(),
                                d.mode.as_str()
                            ),
                            "cannot be honoured",
                        )
                        .help(match d.mode {
                            Mode::FromNow => "a from_now projector never plays history, so a projector that does cannot wait for it",
                            _ => "a once projector stops at the head it reached, so a projector that plays on cannot wait for it",
                        }),
                    );
                }
            }
        }
        // Cycles: depth-first search, reporting each cycle once.
        let mut reported: HashSet<String> = HashSet::new();
        for start in projectors {
            let mut path = vec![start.name.as_str()];
            self.find_cycle(&by_name, &mut path, &mut reported);
        }
    }

    fn find_cycle<'a>(
        &mut self,
        by_name: &BTreeMap<&'a str, &'a Projector>,
        path: &mut Vec<&'a str>,
        reported: &mut HashSet<String>,
    ) {
        let current = *path.last().unwrap();
        let Some(p) = by_name.get(current) else {
            return;
        };
        for dep in &p.after {
            let dep = dep.as_str();
            if dep == current || !by_name.contains_key(dep) {
                continue;
            }
            if let Some(i) = path.iter().position(|n| *n == dep) {
                let cycle: Vec<&str> = path[i..].to_vec();
                let mut key = cycle.clone();
                key.sort();
                if reported.insert(key.join(",")) {
                    let mut shown = cycle.clone();
                    shown.push(dep);
                    let first = by_name[cycle[0]];
                    self.problems.push(
                        Problem::new(
                            first.span.clone(),
                            format!("`after` has a cycle: {}", shown.join(" → ")),
                            "part of a cycle",
                        )
                        .help(format!(
                            "projectors `{}` and `{}` wait for each other; remove one of the `after` entries",
                            cycle[0],
                            cycle[cycle.len() - 1]
                        )),
                    );
                }
                continue;
            }
            if path.len() > by_name.len() {
                return;
            }
            path.push(dep);
            self.find_cycle(by_name, path, reported);
            path.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Manifest, ManifestError> {
        parse(Path::new("projectors.toml"), s.to_string())
    }

    const STORE: &str =
        "[store]\ntable = \"events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\n";

    #[test]
    fn a_valid_manifest() {
        let m = parse_str(&format!(
            "{STORE}[projectors.band]\ntables = [\"band\"]\non.BandCreated = \"INSERT INTO band (name) VALUES (:data.name)\"\n[projectors.x]\nmode = \"once\"\nafter = [\"band\"]\non.A = [\"DELETE FROM x\", \"INSERT INTO x VALUES (:position)\"]\n"
        ))
        .unwrap();
        assert_eq!(m.projectors.len(), 2);
        assert_eq!(m.projectors[1].handlers[0].statements.len(), 2);
        assert_eq!(m.projectors[1].mode, Mode::Once);
    }

    #[test]
    fn three_mistakes_three_problems_with_lines() {
        let err = parse_str(&format!(
            "{STORE}[projectors.band]\nmode = \"sometimes\"\ntabels = [\"band\"]\non.BandCreated = \"INSERT INTO band VALUES (:dta.name)\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
        let text = err.to_string();
        assert!(text.contains("projectors.toml:7:8"), "{text}");
        assert!(text.contains("projectors.toml:8:1"), "{text}");
        assert!(text.contains("projectors.toml:9:44"), "{text}");
        assert!(text.contains("unknown placeholder `:dta.name`"), "{text}");
    }

    #[test]
    fn cycles_name_both_projectors() {
        let err = parse_str(&format!(
            "{STORE}[projectors.a]\nafter = [\"b\"]\non.X = \"SELECT 1\"\n[projectors.b]\nafter = [\"a\"]\non.X = \"SELECT 1\"\n"
        ))
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("a → b → a"), "{text}");
        assert_eq!(err.problems.len(), 1);
    }

    #[test]
    fn neither_on_nor_command_and_empty_file() {
        let err = parse_str(&format!("{STORE}[projectors.p]\nmode = \"once\"\n")).unwrap_err();
        assert!(
            err.to_string()
                .contains("neither `on` handlers nor a `command`")
        );
        let err = parse_str("").unwrap_err();
        assert_eq!(err.problems.len(), 2);
    }

    #[test]
    fn duplicate_handlers_are_syntax_errors() {
        let err = parse_str(&format!(
            "{STORE}[projectors.p]\non.A = \"SELECT 1\"\non.A = \"SELECT 2\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("projectors.toml:8"), "{err}");
    }

    #[test]
    fn unicode_and_very_long_names_are_refused_with_their_place() {
        let long = "a".repeat(200);
        let err = parse_str(&format!(
            "{STORE}[projectors.\"bänd\"]\non.A = \"SELECT 1\"\n[projectors.{long}]\non.A = \"SELECT 1\"\n[projectors.ok]\non.\"Évènement 🎻\" = \"INSERT INTO t VALUES (:data.nämé)\"\n"
        ))
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("projector name `bänd` is not valid"),
            "{text}"
        );
        assert!(
            text.contains(&format!("projector name `{long}` is not valid")),
            "{text}"
        );
        // A unicode event type is fine; a path segment outside [A-Za-z0-9_] ends the placeholder.
        assert_eq!(err.problems.len(), 2, "{text}");
    }

    #[test]
    fn wrong_types_and_bad_names() {
        let err = parse_str(&format!(
            "{STORE}[projectors.Bad-Name]\nside_effects = \"yes\"\nversion = 0\non.A = 5\n"
        ))
        .unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
    }
}

#[cfg(test)]
mod properties {
    //! The parser never panics and every problem points inside the file.
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = include_str!("../../projectors.toml");

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            if let Err(e) = parse(Path::new("p.toml"), text.clone()) {
                for p in &e.problems {
                    prop_assert!(p.span.end <= text.len());
                }
            }
        }

        #[test]
        fn mutated_example_errors_point_inside_the_file(at in 0usize..4000, len in 0usize..20, insert in "[ -~\n]{0,8}") {
            let mut text = EXAMPLE.to_string();
            let at = at.min(text.len());
            let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap();
            let end = (at + len).min(text.len());
            let end = (end..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap();
            text.replace_range(at..end, &insert);
            if let Err(e) = parse(Path::new("p.toml"), text.clone()) {
                prop_assert!(!e.problems.is_empty());
                for p in &e.problems {
                    prop_assert!(p.span.start <= p.span.end && p.span.end <= text.len());
                }
                let _ = e.to_string();
            }
        }
    }
}
