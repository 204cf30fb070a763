//! The placeholder rewriter: splits a handler's SQL into statements and finds
//! its `:position`, `:type`, `:stream`, `:time`, `:data[.a.b]` and
//! `:metadata[.a.b]` placeholders.
//!
//! A small lexer tracks string literals (`'…'`, `E'…'`), quoted identifiers,
//! `--` and nested `/* */` comments and dollar quotes, so text inside them is
//! never touched, and `::` stays a cast. The statement keeps its SQL around
//! the placeholders; [`Statement::render`] turns each placeholder into an
//! expression over a value bound as a parameter or held in a PL/pgSQL
//! variable, so event data never becomes SQL text.

/// A value of the event a placeholder stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Position,
    Type,
    Stream,
    Time,
    /// The payload (`:data`) or the text at a path inside it (`:data.a.b`).
    Data(Vec<String>),
    /// The metadata, whole or at a path.
    Metadata(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Sql(String),
    Value(Value),
}

/// One SQL statement of a handler, its placeholders found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    pub pieces: Vec<Piece>,
}

/// A placeholder-like `:word` that names nothing, or a `$1` parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadPlaceholder {
    /// Byte offset in the handler text.
    pub offset: usize,
    pub text: String,
    pub why: String,
}

/// How each base value is written in the rendered SQL.
pub trait ValueNames {
    fn position(&self) -> &str;
    fn event_type(&self) -> &str;
    fn stream(&self) -> &str;
    fn time(&self) -> &str;
    fn data(&self) -> &str;
    fn metadata(&self) -> &str;
}

impl Statement {
    /// The statement's SQL with each placeholder replaced by an expression
    /// over `names` (parameters such as `$5` or PL/pgSQL variables).
    pub fn render(&self, names: &dyn ValueNames) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Sql(s) => out.push_str(s),
                Piece::Value(v) => out.push_str(&match v {
                    Value::Position => names.position().to_string(),
                    Value::Type => names.event_type().to_string(),
                    Value::Stream => names.stream().to_string(),
                    Value::Time => names.time().to_string(),
                    Value::Data(path) => json_expr(names.data(), path),
                    Value::Metadata(path) => json_expr(names.metadata(), path),
                }),
            }
        }
        out
    }

    /// The first keyword, lowercased (`insert`, `select`, `with`, …).
    pub fn keyword(&self) -> String {
        let first = match self.pieces.first() {
            Some(Piece::Sql(s)) => s.as_str(),
            _ => "",
        };
        first[code_start(first)..]
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect::<String>()
            .to_ascii_lowercase()
    }

    /// The values this statement reads.
    pub fn values(&self) -> impl Iterator<Item = &Value> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Value(v) => Some(v),
            Piece::Sql(_) => None,
        })
    }
}

/// Where the code of `sql` starts, after leading blanks and comments.
pub fn code_start(sql: &str) -> usize {
    let mut lexer = Lexer::new(sql);
    lexer.skip_trivia();
    lexer.pos
}

/// `(base #>> '{a,b}')`: path segments are `[A-Za-z0-9_]` only, so they are
/// safe inside the array literal.
fn json_expr(base: &str, path: &[String]) -> String {
    if path.is_empty() {
        base.to_string()
    } else {
        format!("({base} #>> '{{{}}}')", path.join(","))
    }
}

/// Splits a handler into statements (at top-level `;`) and finds its placeholders.
/// Statements holding nothing but blanks and comments are dropped.
pub fn parse(sql: &str) -> Result<Vec<Statement>, Vec<BadPlaceholder>> {
    let mut lexer = Lexer::new(sql);
    let mut statements = Vec::new();
    let mut problems = Vec::new();
    let mut pieces: Vec<Piece> = Vec::new();
    let mut chunk_start = 0;
    let mut has_code = false;

    let flush_sql = |pieces: &mut Vec<Piece>, text: &str| {
        if !text.is_empty() {
            match pieces.last_mut() {
                Some(Piece::Sql(s)) => s.push_str(text),
                _ => pieces.push(Piece::Sql(text.to_string())),
            }
        }
    };

    while let Some((start, token)) = lexer.next_token() {
        match token {
            Token::Semicolon => {
                flush_sql(&mut pieces, &sql[chunk_start..start]);
                if has_code {
                    statements.push(Statement {
                        pieces: std::mem::take(&mut pieces),
                    });
                } else {
                    pieces.clear();
                }
                has_code = false;
                chunk_start = lexer.pos;
            }
            Token::Code => has_code = true,
            Token::Positional => {
                has_code = true;
                problems.push(BadPlaceholder {
                    offset: start,
                    text: sql[start..lexer.pos].to_string(),
                    why: "positional parameters are not available in handlers: use :position, :type, :stream, :time, :data.path or :metadata.path".into(),
                });
            }
            Token::Colon => {
                has_code = true;
                let (value, len) = read_placeholder(&sql[start + 1..]);
                match value {
                    Ok(v) => {
                        flush_sql(&mut pieces, &sql[chunk_start..start]);
                        pieces.push(Piece::Value(v));
                        chunk_start = start + 1 + len;
                    }
                    Err(why) => problems.push(BadPlaceholder {
                        offset: start,
                        text: sql[start..start + 1 + len].to_string(),
                        why,
                    }),
                }
                lexer.pos = start + 1 + len;
            }
        }
    }
    flush_sql(&mut pieces, &sql[chunk_start..]);
    if has_code {
        // Drop trailing blanks so the statement ends where its code does.
        if let Some(Piece::Sql(s)) = pieces.last_mut() {
            let trimmed = s.trim_end().len();
            s.truncate(trimmed);
        }
        statements.push(Statement { pieces });
    }
    if problems.is_empty() {
        Ok(statements)
    } else {
        Err(problems)
    }
}

/// Replaces the `:name` placeholders of a query that `values` names (a
/// check's `:position`, say) outside string literals, quoted identifiers,
/// comments and dollar quotes; everything else, `::` casts included, stays.
pub fn substitute(sql: &str, values: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    for (start, name) in placeholders(sql) {
        if let Some((_, value)) = values.iter().find(|(n, _)| *n == name) {
            out.push_str(&sql[copied..start]);
            out.push_str(value);
            copied = start + 1 + name.len();
        }
    }
    out.push_str(&sql[copied..]);
    out
}

/// The table an `INSERT INTO`, `UPDATE`, `DELETE FROM` or `MERGE INTO`
/// statement writes (its name, lowercased, without its schema), if the
/// statement is one of those.
pub fn written_table(sql: &str) -> Option<String> {
    let code = code_only(sql).to_lowercase();
    let words: Vec<&str> = code.split_whitespace().collect();
    let target = match words.first().copied()? {
        "insert" | "merge" if words.get(1) == Some(&"into") => words.get(2)?,
        "update" => match words.get(1)? {
            &"only" => words.get(2)?,
            w => w,
        },
        "delete" if words.get(1) == Some(&"from") => match words.get(2)? {
            &"only" => words.get(3)?,
            w => w,
        },
        _ => return None,
    };
    let table = target
        .split('(')
        .next()?
        .rsplit('.')
        .next()?
        .trim_matches('"');
    (!table.is_empty()).then(|| table.to_string())
}

/// The SQL with its literals and comments blanked out (same length).
pub fn code_only(sql: &str) -> String {
    let mut lexer = Lexer::new(sql);
    let mut code = String::with_capacity(sql.len());
    let mut last = 0;
    while let Some((start, token)) = lexer.next_token() {
        if token == Token::Colon {
            lexer.pos = start + 1;
        }
        let text = &sql[start..lexer.pos];
        code.push_str(&" ".repeat(sql[last..start].len()));
        let literal = text.starts_with('\'')
            || (text.starts_with('$')
                && text.len() > 1
                && !text[1..].starts_with(|c: char| c.is_ascii_digit()));
        if literal {
            code.push_str(&" ".repeat(text.len()));
        } else {
            code.push_str(text);
        }
        last = lexer.pos;
    }
    code
}

/// Whether SQL names the table `table` with a schema (`app.band`,
/// `"app"."band"`), outside literals and comments.
pub fn names_qualified(sql: &str, table: &str) -> bool {
    let code = code_only(sql);
    let lower = code.to_lowercase();
    let table = table.to_lowercase();
    [format!(".{table}"), format!(".\"{table}\"")]
        .iter()
        .any(|needle| {
            lower.match_indices(needle.as_str()).any(|(at, m)| {
                let after = lower[at + m.len()..].chars().next();
                let before = lower[..at].chars().next_back();
                after.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '"'))
                    && before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '"')
            })
        })
}

/// Whether a query uses `:name` (outside literals and comments).
pub fn uses(sql: &str, name: &str) -> bool {
    placeholders(sql).any(|(_, n)| n == name)
}

/// Every `:word` of a query outside literals and comments: (offset of the colon, word).
fn placeholders(sql: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut lexer = Lexer::new(sql);
    let mut found = Vec::new();
    while let Some((start, token)) = lexer.next_token() {
        if token == Token::Colon {
            let word = &sql[start + 1..];
            let len = word
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(word.len());
            found.push((start, &word[..len]));
            lexer.pos = start + 1 + len;
        }
    }
    found.into_iter()
}

/// Reads `name(.segment)*` after the colon; returns the value and the length read.
fn read_placeholder(s: &str) -> (Result<Value, String>, usize) {
    let ident_len = |t: &str| {
        t.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(t.len())
    };
    let name_len = ident_len(s);
    let name = &s[..name_len];
    let mut len = name_len;
    let mut path = Vec::new();
    while s[len..].starts_with('.') {
        let seg = ident_len(&s[len + 1..]);
        if seg == 0 {
            break;
        }
        path.push(s[len + 1..len + 1 + seg].to_string());
        len += 1 + seg;
    }
    let value = match (name, path.is_empty()) {
        ("position", true) => Ok(Value::Position),
        ("type", true) => Ok(Value::Type),
        ("stream", true) => Ok(Value::Stream),
        ("time", true) => Ok(Value::Time),
        ("data", _) => Ok(Value::Data(path)),
        ("metadata", _) => Ok(Value::Metadata(path)),
        ("position" | "type" | "stream" | "time", false) => Err(format!(
            ":{name} has no fields: only :data and :metadata take a path"
        )),
        _ => Err("unknown placeholder: use :position, :type, :stream, :time, :data, :data.a.b, :metadata or :metadata.a.b (write `::` for a cast)".into()),
    };
    (value, len)
}

fn follows_ident(sql: &str, at: usize) -> bool {
    sql[..at]
        .chars()
        .next_back()
        .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$')
}

/// `E'…'` strings take backslash escapes.
fn is_escape_string_prefix(sql: &str, quote_at: usize) -> bool {
    let before = &sql[..quote_at];
    before.ends_with(['E', 'e']) && !follows_ident(before, before.len() - 1)
}

/// `$$` or `$tag$` at the start of `s`.
fn dollar_tag(s: &str) -> Option<String> {
    let body = &s[1..];
    let len = body
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(body.len());
    if body[len..].starts_with('$') && !body.starts_with(|c: char| c.is_ascii_digit()) {
        Some(s[..len + 2].to_string())
    } else {
        None
    }
}

/// What the lexer found at a place of the text (outside literals and comments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// A top-level `;`.
    Semicolon,
    /// A `:` followed by a letter or `_` (the lexer stops at the colon: the
    /// caller reads the word and moves `pos` past it).
    Colon,
    /// `$1`: a positional parameter.
    Positional,
    /// Anything else: code, a literal, an identifier, a cast.
    Code,
}

struct Lexer<'a> {
    sql: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(sql: &'a str) -> Self {
        Lexer { sql, pos: 0 }
    }

    /// The next token after blanks and comments, and where it starts.
    fn next_token(&mut self) -> Option<(usize, Token)> {
        self.skip_trivia();
        let sql = self.sql;
        let start = self.pos;
        let rest = &sql[start..];
        let c = rest.chars().next()?;
        let token = match c {
            ';' => {
                self.pos += 1;
                Token::Semicolon
            }
            '\'' => {
                self.skip_quoted('\'', is_escape_string_prefix(sql, start));
                Token::Code
            }
            '"' => {
                self.skip_quoted('"', false);
                Token::Code
            }
            '$' => match dollar_tag(rest).filter(|_| !follows_ident(sql, start)) {
                Some(tag) => {
                    self.pos += tag.len();
                    match sql[self.pos..].find(&tag) {
                        Some(end) => self.pos += end + tag.len(),
                        None => self.pos = sql.len(),
                    }
                    Token::Code
                }
                None if rest[1..].starts_with(|c: char| c.is_ascii_digit())
                    && !follows_ident(sql, start) =>
                {
                    self.pos += 1 + rest[1..].chars().take_while(|c| c.is_ascii_digit()).count();
                    Token::Positional
                }
                None => {
                    self.pos += 1;
                    Token::Code
                }
            },
            ':' if rest.starts_with("::") => {
                self.pos += 2;
                Token::Code
            }
            ':' if rest[1..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') => {
                Token::Colon
            }
            _ => {
                self.pos += c.len_utf8();
                Token::Code
            }
        };
        Some((start, token))
    }

    /// Skips blanks and comments; true when it moved.
    fn skip_trivia(&mut self) -> bool {
        let start = self.pos;
        loop {
            let rest = &self.sql[self.pos..];
            if rest.starts_with(char::is_whitespace) {
                self.pos += rest.chars().next().unwrap().len_utf8();
            } else if rest.starts_with("--") {
                self.pos += rest.find('\n').unwrap_or(rest.len());
            } else if rest.starts_with("/*") {
                let mut depth = 0;
                let mut i = 0;
                let bytes = rest.as_bytes();
                while i < bytes.len() {
                    if bytes[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if bytes[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                self.pos += i;
            } else {
                return self.pos != start;
            }
        }
    }

    /// Skips a quoted literal starting at `pos`; a doubled quote is an escaped quote.
    fn skip_quoted(&mut self, quote: char, backslash_escapes: bool) {
        let bytes = self.sql.as_bytes();
        let q = quote as u8;
        let mut i = self.pos + 1;
        while i < bytes.len() {
            if backslash_escapes && bytes[i] == b'\\' {
                i += 2;
            } else if bytes[i] == q {
                if bytes.get(i + 1) == Some(&q) {
                    i += 2;
                } else {
                    i += 1;
                    break;
                }
            } else {
                i += 1;
            }
        }
        self.pos = i.min(bytes.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // The parameters validate prepares handlers with: $1 position … $6 metadata.
    use crate::handlers::sql::Parameters as Params;

    fn one(sql: &str) -> String {
        let s = parse(sql).unwrap();
        assert_eq!(s.len(), 1, "{s:?}");
        s[0].render(&Params)
    }

    #[test]
    fn placeholders_become_parameters() {
        assert_eq!(
            one("INSERT INTO band (id, name, created) VALUES (:stream::uuid, :data.name, :time)"),
            "INSERT INTO band (id, name, created) VALUES ($3::uuid, ($5 #>> '{name}'), $4)"
        );
        assert_eq!(
            one("SELECT :data.a.b_c::float8, :data, :position, :type, :metadata.m"),
            "SELECT ($5 #>> '{a,b_c}')::float8, $5, $1, $2, ($6 #>> '{m}')"
        );
    }

    #[test]
    fn substitute_replaces_only_named_placeholders_outside_literals() {
        let sql = "SELECT count(*) FROM events WHERE id <= :position AND x::text <> ':position' -- :position\n AND :other";
        assert_eq!(
            substitute(sql, &[("position", "42::bigint".into())]),
            "SELECT count(*) FROM events WHERE id <= 42::bigint AND x::text <> ':position' -- :position\n AND :other"
        );
        assert!(uses(sql, "position"));
        assert!(!uses("SELECT ':position', $$ :position $$", "position"));
    }

    #[test]
    fn the_table_a_statement_writes() {
        assert_eq!(
            written_table("INSERT INTO band (id) VALUES (1)").as_deref(),
            Some("band")
        );
        assert_eq!(
            written_table("insert into public.\"Band\"(id) values (1)").as_deref(),
            Some("band")
        );
        assert_eq!(
            written_table("UPDATE counter SET n = n + 1").as_deref(),
            Some("counter")
        );
        assert_eq!(
            written_table("DELETE FROM ONLY x WHERE true").as_deref(),
            Some("x")
        );
        assert_eq!(
            written_table("/* c */ MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE")
                .as_deref(),
            Some("t")
        );
        assert_eq!(written_table("SELECT 1"), None);
    }

    #[test]
    fn qualified_table_names_are_found_outside_literals() {
        assert!(names_qualified(
            "INSERT INTO public.band VALUES (1)",
            "band"
        ));
        assert!(names_qualified("UPDATE \"app\".\"band\" SET x = 1", "band"));
        assert!(!names_qualified("INSERT INTO band VALUES (1)", "band"));
        assert!(!names_qualified(
            "SELECT 'public.band', b.bandname FROM band b",
            "band"
        ));
        assert!(!names_qualified(
            "SELECT x.band_id FROM t x -- public.band",
            "band"
        ));
    }

    #[test]
    fn casts_stay_casts() {
        assert_eq!(
            one("SELECT 1::int, now()::date"),
            "SELECT 1::int, now()::date"
        );
    }

    #[test]
    fn strings_identifiers_comments_and_dollar_quotes_are_untouched() {
        let sql = "SELECT ':data', \":data\", $$ :data ; $$, $t$ :type $t$, E'\\' :x' -- :nope ;\n /* :c /* :d */ ; */ , :position";
        assert_eq!(one(sql), sql.replace(", :position", ", $1"));
    }

    #[test]
    fn statements_split_on_top_level_semicolons() {
        let s = parse(
            "DELETE FROM a WHERE id = :stream::uuid; ; -- c\nINSERT INTO b VALUES (';');\n  ",
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].render(&Params), "DELETE FROM a WHERE id = $3::uuid");
        assert_eq!(
            s[1].render(&Params).trim(),
            "-- c\nINSERT INTO b VALUES (';')"
        );
        assert_eq!(s[1].keyword(), "insert");
    }

    #[test]
    fn unknown_placeholders_are_reported_with_their_offset() {
        let err = parse("SELECT :data.x, :nme, :stream.x").unwrap_err();
        assert_eq!(err.len(), 2);
        assert_eq!((err[0].offset, err[0].text.as_str()), (16, ":nme"));
        assert_eq!(err[1].text, ":stream.x");
        let err = parse("SELECT $1").unwrap_err();
        assert_eq!(err[0].text, "$1");
    }

    #[test]
    fn assignment_and_slices_are_not_placeholders() {
        assert_eq!(
            one("SELECT f(a := 1), arr[1:2]"),
            "SELECT f(a := 1), arr[1:2]"
        );
    }

    #[test]
    fn injection_attempts_in_data_stay_data() {
        // The payload is never part of the SQL: the rendered text does not depend on it.
        let rendered = one("INSERT INTO band (name) VALUES (:data.name)");
        assert!(!rendered.contains("DROP"));
        assert_eq!(
            rendered,
            "INSERT INTO band (name) VALUES (($5 #>> '{name}'))"
        );
    }
}

#[cfg(test)]
mod properties {
    //! Property tests of the rewriter: it never panics, never touches quoted
    //! text, and replaces exactly the placeholders it was given.
    use super::*;
    use proptest::prelude::*;

    struct Named;
    impl ValueNames for Named {
        fn position(&self) -> &str {
            "P"
        }
        fn event_type(&self) -> &str {
            "T"
        }
        fn stream(&self) -> &str {
            "S"
        }
        fn time(&self) -> &str {
            "W"
        }
        fn data(&self) -> &str {
            "D"
        }
        fn metadata(&self) -> &str {
            "M"
        }
    }

    /// A piece of SQL and what it must render to.
    fn piece() -> impl Strategy<Value = (String, String)> {
        let text = "[ -~]{0,12}";
        prop_oneof![
            // Quoted regions keep their content, whatever it is (placeholders included).
            text.prop_map(|t: String| {
                let s = format!("'{}'", t.replace('\'', "''"));
                (s.clone(), s)
            }),
            text.prop_map(|t: String| {
                let s = format!("\"{}\"", t.replace('"', "\"\""));
                (s.clone(), s)
            }),
            "[ -~&&[^$]]{0,12}".prop_map(|t: String| {
                let s = format!("$q${t}$q$");
                (s.clone(), s)
            }),
            "[ -~&&[^*/]]{0,12}".prop_map(|t: String| {
                let s = format!("/* {t} */");
                (s.clone(), s)
            }),
            "[ -~]{0,12}".prop_map(|t: String| {
                let s = format!("-- {t}\n");
                (s.clone(), s)
            }),
            // Placeholders.
            Just((":position".to_string(), "P".to_string())),
            Just((":stream::uuid".to_string(), "S::uuid".to_string())),
            "[a-z_]{1,6}(\\.[a-z0-9_]{1,4}){0,2}".prop_map(|path: String| (
                format!(":data.{path}"),
                format!("(D #>> '{{{}}}')", path.replace('.', ","))
            )),
            // Plain SQL words and casts.
            "(select|insert|x|1|\\(|\\)|,|::int|=| )".prop_map(|t: String| (t.clone(), t)),
        ]
    }

    proptest! {
        #[test]
        fn never_panics(sql in "\\PC{0,200}") {
            let _ = parse(&sql);
        }

        #[test]
        fn quoted_text_is_untouched_and_placeholders_replaced(pieces in prop::collection::vec(piece(), 1..12)) {
            // A statement of only comments is dropped: start with code.
            let sql = format!("select {}", pieces.iter().map(|p| p.0.as_str()).collect::<Vec<_>>().join(" "));
            let want = format!("select {}", pieces.iter().map(|p| p.1.as_str()).collect::<Vec<_>>().join(" "));
            let statements = parse(&sql).expect("only known placeholders");
            let got: String = statements.iter().map(|s| s.render(&Named)).collect::<Vec<_>>().join(";");
            prop_assert_eq!(got.trim_end(), want.trim_end());
        }
    }
}
