//! The `tollgate` binary as users and CI drive it: `check` (exit codes, the
//! three output formats and where they go), `routes` and `fmt`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn tollgate(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("NO_COLOR")
        .env_remove("JWT_SECRET")
        .output()
        .expect("run tollgate")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("UTF-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("UTF-8 stderr")
}

/// A config file in a fresh temporary directory.
fn conf(text: &str) -> (tempfile::TempDir, PathBuf) {
    conf_named("gateway.conf", text)
}

fn conf_named(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create dirs");
    }
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

fn check(path: &Path, format: &str) -> Output {
    tollgate(&[
        "check",
        "-c",
        path.to_str().expect("UTF-8 path"),
        "--format",
        format,
    ])
}

fn json(o: &Output) -> Vec<Value> {
    match serde_json::from_str::<Value>(&stdout(o)) {
        Ok(Value::Array(a)) => a,
        other => panic!("not a JSON array: {other:?}\n{}", stdout(o)),
    }
}

const VALID: &str = "\
server {
    listen 8080;
    location / {
        return 200 \"ok\";
    }
}
";

// ---- exit codes ------------------------------------------------------------

#[test]
fn valid_config_exits_0() {
    let (_d, p) = conf(VALID);
    let o = check(&p, "human");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains(": ok ("), "{}", stderr(&o));
}

#[test]
fn invalid_config_exits_1() {
    let (_d, p) =
        conf("server {\n    listen 8080;\n    location / {\n        retrun 200;\n    }\n}\n");
    let o = check(&p, "human");
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("tollgate::unknown_directive"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("did you mean `return`?"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn missing_file_exits_2() {
    let o = tollgate(&["check", "-c", "tests/no/such/gateway.conf"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("cannot read"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty());
    // The machine formats too: an I/O error is not a config diagnostic.
    let o = tollgate(&[
        "check",
        "-c",
        "tests/no/such/gateway.conf",
        "--format",
        "json",
    ]);
    assert_eq!(code(&o), 2);
    assert!(stdout(&o).is_empty());
}

#[test]
fn usage_errors_exit_2() {
    let (_d, p) = conf(VALID);
    let p = p.to_str().expect("UTF-8 path");
    for args in [
        &["check", "-c", p, "--bogus"][..],
        &["check", "-c", p, "--format", "xml"],
        &["frobnicate"],
        &[],
    ] {
        let o = tollgate(args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
    }
    assert_eq!(code(&tollgate(&["--help"])), 0);
}

#[test]
fn warnings_alone_exit_0() {
    let text = format!("upstream legacy {{\n    server 127.0.0.1:3009;\n}}\n\n{VALID}");
    let (_d, p) = conf(&text);
    let o = check(&p, "json");
    assert_eq!(code(&o), 0);
    let list = json(&o);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["severity"], "warning");
    assert_eq!(list[0]["code"], "tollgate::unused_definition");

    let o = check(&p, "github");
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).starts_with("::warning file="), "{}", stdout(&o));

    let o = check(&p, "human");
    assert_eq!(code(&o), 0);
    assert!(stderr(&o).contains("1 warning"), "{}", stderr(&o));
}

// ---- every diagnostic in one run -------------------------------------------

#[test]
fn every_error_is_reported_in_one_run() {
    let text = "\
upstream app {
    server 127.0.0.1:3001;
}

server {
    listen 8080;
    client_max_body_size 10mb;
    location / {
        proxy_pass http://ap;
        proxy_read_timeout 5x;
    }
    location /b/ {
        retrun 200;
    }
    location ~ ^/(x {
        return 200;
    }
}
";
    let (_d, p) = conf(text);
    let o = check(&p, "json");
    assert_eq!(code(&o), 1);
    let codes: Vec<String> = json(&o)
        .iter()
        .map(|d| d["code"].as_str().expect("code").to_string())
        .collect();
    assert_eq!(
        codes,
        [
            "tollgate::invalid_size",
            "tollgate::unknown_upstream",
            "tollgate::invalid_duration",
            "tollgate::unknown_directive",
            "tollgate::invalid_regex",
        ],
        "in file order, each once"
    );
}

// ---- --format json ---------------------------------------------------------

#[test]
fn json_objects_have_the_documented_fields_with_character_columns() {
    let line4 = "        add_header X-Greeting \"héllo wörld ✓\"; retrun 200;";
    let text = format!("server {{\n    listen 8080;\n    location / {{\n{line4}\n    }}\n}}\n");
    let (_d, p) = conf(&text);
    let o = check(&p, "json");
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).is_empty(),
        "json writes nothing to stderr: {}",
        stderr(&o)
    );
    let list = json(&o);
    assert_eq!(list.len(), 1, "{list:?}");
    let d = list[0].as_object().expect("object");
    let mut keys: Vec<&str> = d.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "code",
            "column",
            "end_column",
            "end_line",
            "file",
            "help",
            "line",
            "message",
            "severity"
        ]
    );
    let byte_col = line4.find("retrun").expect("token") + 1;
    let char_col = line4[..byte_col - 1].chars().count() + 1;
    assert_ne!(
        byte_col, char_col,
        "the line must have multibyte characters before the token"
    );
    assert_eq!(d["file"], p.to_str().expect("UTF-8 path"));
    assert_eq!(d["line"], 4);
    assert_eq!(d["column"], char_col);
    assert_eq!(d["end_line"], 4);
    assert_eq!(d["end_column"], char_col + "retrun".len());
    assert_eq!(d["severity"], "error");
    assert_eq!(d["code"], "tollgate::unknown_directive");
    assert_eq!(d["message"], "unknown directive `retrun`");
    assert_eq!(d["help"], "did you mean `return`?");
}

#[test]
fn json_for_a_valid_config_is_an_empty_array() {
    let (_d, p) = conf(VALID);
    let o = check(&p, "json");
    assert_eq!(code(&o), 0);
    assert!(json(&o).is_empty());
}

#[test]
fn json_lines_are_one_based_at_the_start_of_a_file() {
    let (_d, p) = conf("bogus_directive on;\n");
    let list = json(&check(&p, "json"));
    let d = list
        .iter()
        .find(|d| d["code"] == "tollgate::unknown_directive")
        .expect("unknown_directive");
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        (d["end_line"].as_u64(), d["end_column"].as_u64()),
        (Some(1), Some(16))
    );
}

// ---- --format github -------------------------------------------------------

#[test]
fn github_lines_have_positions_and_code() {
    let (_d, p) =
        conf("server {\n    listen 8080;\n    location / {\n        retrun 200;\n    }\n}\n");
    let o = check(&p, "github");
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    // `:` and `,` are escaped in properties: the title's `::` would
    // otherwise end the property list early.
    let want = format!(
        "::error file={},line=4,col=9,endLine=4,endColumn=15,title=tollgate%3A%3Aunknown_directive::unknown directive `retrun`%0Ahelp: did you mean `return`?",
        p.display()
    );
    assert_eq!(lines[0], want);
}

#[test]
fn github_escapes_percent_newlines_and_property_separators() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sub = dir.path().join("odd,name:dir");
    std::fs::create_dir(&sub).expect("mkdir");
    let path = sub.join("gateway.conf");
    let text = "server {\n    listen 8080;\n    client_max_body_size 10%;\n    location / {\n        return \"2\r0\n0\";\n    }\n}\n";
    std::fs::write(&path, text).expect("write");
    let o = check(&path, "github");
    assert_eq!(code(&o), 1);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "one line per diagnostic, newlines escaped: {out:?}"
    );
    let escaped_path = path
        .display()
        .to_string()
        .replace(':', "%3A")
        .replace(',', "%2C");
    for l in &lines {
        assert!(
            l.starts_with(&format!("::error file={escaped_path},line=")),
            "{l}"
        );
        assert!(!l.contains('\r'), "{l:?}");
    }
    assert!(
        lines[0].contains("::bad size: `10%25` is not a size%0Ahelp: "),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("::`2%0D0%0A0` is not an HTTP status code%0Ahelp: "),
        "{}",
        lines[1]
    );
}

// ---- human -----------------------------------------------------------------

#[test]
fn human_goes_to_stderr_without_colour_when_not_a_terminal() {
    let (_d, p) =
        conf("server {\n    listen 8080;\n    location / {\n        retrun 200;\n    }\n}\n");
    // Piped (not a tty): no ANSI escapes, with or without NO_COLOR.
    for no_color in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.args(["check", "-c", p.to_str().expect("UTF-8 path")]);
        if no_color {
            cmd.env("NO_COLOR", "1");
        } else {
            cmd.env_remove("NO_COLOR");
        }
        let o = cmd.output().expect("run tollgate");
        assert_eq!(code(&o), 1);
        assert!(stdout(&o).is_empty(), "human writes nothing to stdout");
        let err = stderr(&o);
        assert!(err.contains("unknown directive `retrun`"), "{err}");
        assert!(!err.contains('\u{1b}'), "ANSI escape in {err:?}");
        assert!(err.contains(":4:9]"), "file:line:col of the token: {err}");
        assert!(err.contains("1 error, 0 warnings"), "{err}");
    }
}

/// NGINX forms that a checker must not reject (found rejected once).
#[test]
fn nginx_forms_check_clean() {
    let text = r#"
auth_jwt users {
    algorithms HS256;
    secret "not-a-real-secret";
}

upstream backend {
    server 127.0.0.1:3001;
    hash $jwt_claim_sub consistent;
}

server {
    listen 8080;
    server_name "~^(?<tenant>[a-z]+)\.example\.com$";

    # Modifiers glued to the URI.
    location =/exact { return 204; }
    location ^~/static/ { proxy_pass http://127.0.0.1:3002; }
    location ~*\.(png|gif)$ { proxy_pass http://127.0.0.1:3002; }

    # A URI part that starts with a variable.
    location /raw/ { proxy_pass http://127.0.0.1:3002$request_uri; }
    location ~ ^/v2/(.*)$ { proxy_pass http://127.0.0.1:3002/api/$1?$args; }

    # Hashing on a claim is fine where a token is verified.
    location /api/ {
        auth_jwt users;
        proxy_set_header X-User "id=${jwt_claim_sub}";
        proxy_pass http://backend;
    }
}
"#;
    let (_d, p) = conf(text);
    let o = check(&p, "json");
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(json(&o).is_empty(), "{}", stdout(&o));
}

// ---- examples --------------------------------------------------------------

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("examples/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_example_checks_clean() {
    let list = examples();
    assert!(list.len() >= 3, "{list:?}");
    for p in list {
        let o = check(&p, "json");
        assert_eq!(code(&o), 0, "{}: {}", p.display(), stdout(&o));
        assert!(
            json(&o).is_empty(),
            "{}: not even a warning expected: {}",
            p.display(),
            stdout(&o)
        );
    }
}

// ---- routes ----------------------------------------------------------------

#[test]
fn routes_prints_the_demo_table_in_router_order() {
    let o = tollgate(&["routes", "-c", "examples/demo.conf"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let mut lines = out.lines();
    let header = lines.next().expect("header");
    for col in ["SERVER", "LOCATION", "MATCH", "HANDLER", "POLICIES"] {
        assert!(header.contains(col), "{header}");
    }
    let locations: Vec<String> = lines
        .map(|l| {
            // Columns are separated by two or more spaces.
            let cols: Vec<&str> = l
                .split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect();
            cols[1].to_string()
        })
        .collect();
    assert_eq!(
        locations,
        [
            "= /health",
            "~ ^/api/order-details/(?<id>[0-9]+)$",
            "/api/products",
            "/api/orders",
            "/api/users",
        ],
        "{out}"
    );
    assert!(
        out.contains("proxy_pass http://user_service/users"),
        "{out}"
    );
    assert!(out.contains("aggregate order,user,product"), "{out}");
}

#[test]
fn routes_of_an_invalid_config_exits_1_with_diagnostics() {
    let (_d, p) =
        conf("server {\n    listen 8080;\n    location / {\n        retrun 200;\n    }\n}\n");
    let o = tollgate(&["routes", "-c", p.to_str().expect("UTF-8 path")]);
    assert_eq!(code(&o), 1);
    assert!(stdout(&o).is_empty());
    assert!(stderr(&o).contains("unknown_directive"), "{}", stderr(&o));
}

// ---- fmt -------------------------------------------------------------------

const UNFORMATTED: &str = "server {\nlisten   8080;\n  location / { return 200; }\n}\n";
const FORMATTED: &str =
    "server {\n    listen 8080;\n    location / {\n        return 200;\n    }\n}\n";

#[test]
fn fmt_check_names_files_that_would_change_and_changes_nothing() {
    let (d, ugly) = conf_named("ugly.conf", UNFORMATTED);
    let tidy = d.path().join("tidy.conf");
    std::fs::write(&tidy, FORMATTED).expect("write");
    let o = tollgate(&[
        "fmt",
        "--check",
        ugly.to_str().expect("UTF-8 path"),
        tidy.to_str().expect("UTF-8 path"),
    ]);
    assert_eq!(code(&o), 1);
    assert_eq!(stdout(&o), format!("{}\n", ugly.display()));
    assert_eq!(
        std::fs::read_to_string(&ugly).expect("read"),
        UNFORMATTED,
        "--check writes nothing"
    );

    let o = tollgate(&["fmt", "--check", tidy.to_str().expect("UTF-8 path")]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).is_empty());
}

#[test]
fn fmt_rewrites_in_place() {
    let (_d, p) = conf(UNFORMATTED);
    let o = tollgate(&["fmt", p.to_str().expect("UTF-8 path")]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&p).expect("read"), FORMATTED);
}

#[test]
fn fmt_dash_reads_stdin_and_writes_stdout() {
    let mut child = Command::new(BIN)
        .args(["fmt", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(UNFORMATTED.as_bytes())
        .expect("write stdin");
    let o = child.wait_with_output().expect("wait");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stdout(&o), FORMATTED);
}

#[test]
fn fmt_refuses_a_file_that_does_not_parse() {
    let (_d, p) = conf("server {\n    listen 8080\n");
    let o = tollgate(&["fmt", "--check", p.to_str().expect("UTF-8 path")]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("missing_semicolon") || stderr(&o).contains("unclosed_block"),
        "{}",
        stderr(&o)
    );
    let o = tollgate(&["fmt", "--check", "tests/no/such.conf"]);
    assert_eq!(code(&o), 2);
}
