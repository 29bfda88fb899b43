//! The TextMate grammar in editors/: valid JSON with the expected scopes,
//! every regex accepted by the `regex` crate (so it uses nothing beyond
//! what Oniguruma and Rust agree on), and, run over every example config
//! with a small TextMate-style tokenizer, it marks exactly the directives
//! the parser sees. Every directive name of the table is a directive token.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;
use tollgate::config::ast::Directive;
use tollgate::config::diagnostics::Diagnostics;
use tollgate::config::parse::parse_text;
use tollgate::config::schema::DIRECTIVES;
use tollgate::config::source::FileId;

const SUFFIX: &str = ".gateway-conf";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn grammar() -> Value {
    let text = std::fs::read_to_string(root().join("editors/gateway-conf.tmLanguage.json"))
        .expect("read the grammar");
    serde_json::from_str(&text).expect("the grammar is valid JSON")
}

/// Every `match` / `begin` / `end` regex in the grammar, with where it is.
fn regexes(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("match" | "begin" | "end", Value::String(s)) => {
                        out.push((format!("{at}.{k}"), s.clone()))
                    }
                    _ => regexes(x, &format!("{at}.{k}"), out),
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                regexes(x, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn scopes(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "name"
                    && let Value::String(s) = x
                {
                    out.insert(s.clone());
                }
                scopes(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| scopes(x, out)),
        _ => {}
    }
}

#[test]
fn grammar_is_valid_json_with_the_expected_scopes() {
    let g = grammar();
    assert_eq!(g["scopeName"], "source.gateway-conf");
    let mut have = BTreeSet::new();
    scopes(&g, &mut have);
    for want in [
        "comment.line.number-sign",
        "string.quoted.double",
        "string.quoted.single",
        "constant.character.escape",
        "variable.other",
        "keyword.control.block",
        "keyword.other.directive",
        "keyword.operator.location-modifier",
        "string.regexp.location",
        "entity.name.type.definition",
        "constant.numeric",
        "constant.numeric.rate",
        "constant.language",
        "punctuation.terminator.statement",
    ] {
        assert!(
            have.contains(&format!("{want}{SUFFIX}")),
            "missing scope {want}{SUFFIX}; have {have:?}"
        );
    }
    // Every include points into the repository.
    let repo = g["repository"].as_object().expect("repository");
    let text = g.to_string();
    for inc in Regex::new(r##""include":"#([a-z-]+)""##)
        .expect("re")
        .captures_iter(&text)
    {
        assert!(repo.contains_key(&inc[1]), "unknown include #{}", &inc[1]);
    }
}

#[test]
fn every_regex_compiles_with_the_regex_crate() {
    let mut list = Vec::new();
    regexes(&grammar(), "grammar", &mut list);
    assert!(list.len() > 10, "{list:?}");
    for (at, re) in list {
        if let Err(e) = Regex::new(&re) {
            panic!("{at}: `{re}` does not compile:\n{e}");
        }
    }
}

#[test]
fn the_vscode_extension_ships_the_same_grammar() {
    let a = std::fs::read_to_string(root().join("editors/gateway-conf.tmLanguage.json"))
        .expect("grammar");
    let b = std::fs::read_to_string(
        root().join("editors/vscode/syntaxes/gateway-conf.tmLanguage.json"),
    )
    .expect("extension copy");
    assert!(
        a == b,
        "editors/vscode/syntaxes/ must be a copy of editors/gateway-conf.tmLanguage.json"
    );
    let pkg: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("editors/vscode/package.json")).expect("package"),
    )
    .expect("package.json is JSON");
    let gr = &pkg["contributes"]["grammars"][0];
    assert_eq!(gr["scopeName"], "source.gateway-conf");
    let path = gr["path"].as_str().expect("path");
    assert!(root().join("editors/vscode").join(path).exists(), "{path}");
    assert_eq!(pkg["contributes"]["languages"][0]["id"], gr["language"]);
}

// ---------------------------------------------------------------- tokenizer

/// One rule of the grammar, flattened from the top-level patterns.
enum Rule {
    Match {
        re: Regex,
        name: Option<String>,
        captures: Vec<(usize, String)>,
    },
    Begin {
        begin: Regex,
        end: Regex,
        inner: Vec<Regex>,
    },
}

fn rules(g: &Value) -> Vec<Rule> {
    fn flatten(g: &Value, p: &Value, out: &mut Vec<Rule>) {
        if let Some(inc) = p["include"].as_str() {
            let key = inc.trim_start_matches('#');
            return flatten(g, &g["repository"][key], out);
        }
        if let Some(list) = p["patterns"].as_array()
            && p.get("begin").is_none()
        {
            for x in list {
                flatten(g, x, out);
            }
            return;
        }
        let name = p["name"].as_str().map(str::to_string);
        if let Some(m) = p["match"].as_str() {
            let captures = p["captures"]
                .as_object()
                .map(|c| {
                    c.iter()
                        .filter_map(|(k, v)| {
                            Some((k.parse().ok()?, v["name"].as_str()?.to_string()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Rule::Match {
                re: Regex::new(m).expect("regex"),
                name,
                captures,
            });
        } else if let (Some(b), Some(e)) = (p["begin"].as_str(), p["end"].as_str()) {
            let mut inner = Vec::new();
            for x in p["patterns"].as_array().into_iter().flatten() {
                let mut r = Vec::new();
                flatten(g, x, &mut r);
                inner.extend(r.into_iter().filter_map(|r| match r {
                    Rule::Match { re, .. } => Some(re),
                    Rule::Begin { .. } => None,
                }));
            }
            out.push(Rule::Begin {
                begin: Regex::new(b).expect("regex"),
                end: Regex::new(e).expect("regex"),
                inner,
            });
        }
    }
    let mut out = Vec::new();
    flatten(g, &serde_json::json!({"patterns": g["patterns"]}), &mut out);
    out
}

/// Tokenize like a TextMate engine (per line; the leftmost match wins,
/// ties go to the earlier rule; begin/end rules may span lines) and return
/// (line, text) of every token with `scope`.
fn tokens_with(rules: &[Rule], text: &str, scope: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut open: Option<usize> = None;
    for (ln, line) in text.lines().enumerate() {
        let mut pos = 0;
        while pos <= line.len() {
            if let Some(ri) = open {
                let Rule::Begin { end, inner, .. } = &rules[ri] else {
                    unreachable!()
                };
                let e = end.find_at(line, pos);
                let i = inner
                    .iter()
                    .filter_map(|r| r.find_at(line, pos))
                    .filter(|m| m.end() > m.start())
                    .min_by_key(|m| m.start());
                match (e, i) {
                    (Some(e), Some(i)) if i.start() < e.start() => pos = i.end(),
                    (Some(e), _) => {
                        pos = e.end();
                        open = None;
                    }
                    (None, _) => break,
                }
                continue;
            }
            let mut best: Option<(usize, usize, usize)> = None; // (start, rule, end)
            for (ri, r) in rules.iter().enumerate() {
                let m = match r {
                    Rule::Match { re, .. } => re.find_at(line, pos),
                    Rule::Begin { begin, .. } => begin.find_at(line, pos),
                };
                if let Some(m) = m
                    && best.is_none_or(|(s, _, _)| m.start() < s)
                {
                    best = Some((m.start(), ri, m.end()));
                }
            }
            let Some((start, ri, end)) = best else { break };
            match &rules[ri] {
                Rule::Match { re, name, captures } => {
                    if name.as_deref() == Some(scope) {
                        found.push((ln + 1, line[start..end].to_string()));
                    }
                    if let Some(c) = re.captures_at(line, pos) {
                        for (i, n) in captures {
                            if n == scope
                                && let Some(m) = c.get(*i)
                            {
                                found.push((ln + 1, m.as_str().to_string()));
                            }
                        }
                    }
                }
                Rule::Begin { .. } => open = Some(ri),
            }
            pos = if end > start { end } else { start + 1 };
        }
    }
    found
}

fn directive_names(ds: &[Directive], text: &str, out: &mut Vec<(usize, String)>) {
    for d in ds {
        let line = text[..d.name_span.start as usize].matches('\n').count() + 1;
        out.push((line, d.name.clone()));
        if let Some(b) = &d.block {
            directive_names(&b.directives, text, out);
        }
    }
}

fn example_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir)
        .expect("examples")
        .map_while(Result::ok)
    {
        let p = e.path();
        if p.is_dir() {
            example_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "conf") {
            out.push(p);
        }
    }
}

#[test]
fn directive_tokens_are_exactly_the_parsed_directives_in_every_example() {
    let g = grammar();
    let rules = rules(&g);
    let mut files = Vec::new();
    example_files(&root().join("examples"), &mut files);
    files.sort();
    assert!(files.len() >= 3);
    let mut seen_names = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read example");
        let mut diags = Diagnostics::new();
        let ast = parse_text(FileId(0), &text, &mut diags);
        let mut want = Vec::new();
        directive_names(&ast.directives, &text, &mut want);
        let mut have = tokens_with(&rules, &text, &format!("keyword.other.directive{SUFFIX}"));
        have.extend(tokens_with(
            &rules,
            &text,
            &format!("keyword.control.block{SUFFIX}"),
        ));
        have.sort();
        want.sort();
        assert_eq!(
            have,
            want,
            "{}: directive tokens differ from the parse",
            f.display()
        );
        seen_names.extend(want.into_iter().map(|(_, n)| n));
        // Whole-line comments are comments (and, above, no directives).
        let comments = tokens_with(&rules, &text, &format!("comment.line.number-sign{SUFFIX}"));
        let lines: BTreeSet<usize> = comments.iter().map(|(l, _)| *l).collect();
        for (i, l) in text.lines().enumerate() {
            if l.trim_start().starts_with('#') {
                assert!(
                    lines.contains(&(i + 1)),
                    "{}:{}: not a comment token",
                    f.display(),
                    i + 1
                );
            }
        }
    }
    assert!(seen_names.len() > 30, "{seen_names:?}");
}

#[test]
fn every_directive_of_the_table_is_a_directive_token() {
    let rules = rules(&grammar());
    let scope_simple = format!("keyword.other.directive{SUFFIX}");
    let scope_block = format!("keyword.control.block{SUFFIX}");
    for d in DIRECTIVES {
        // Each entry written out the way its syntax line shows it.
        let line = if d.syntax.contains('{') {
            format!("{} x {{", d.name)
        } else {
            format!("    {} x;", d.name)
        };
        let mut got = tokens_with(&rules, &line, &scope_simple);
        got.extend(tokens_with(&rules, &line, &scope_block));
        assert_eq!(
            got,
            vec![(1, d.name.to_string())],
            "`{line}` is not highlighted as the directive `{}`",
            d.name
        );
    }
}
