//! LANGUAGE.md §9 timing and field references: calls whose inputs are
//! ready run concurrently, and a reference to a missing or non-scalar field
//! fails only the call that needed it.

mod util;

use std::time::{Duration, Instant};

use util::*;

#[test]
fn independent_calls_run_concurrently() {
    let delay = Duration::from_millis(400);
    let a = TestUpstream::with("a", move |_| {
        Reply::json(serde_json::json!({"v": "a"})).delay(delay)
    });
    let b = TestUpstream::with("b", move |_| {
        Reply::json(serde_json::json!({"v": "b"})).delay(delay)
    });
    let gw = Gateway::start(&format!(
        "access_log off;\nserver {{ listen @PORT@; location = /both {{ aggregate {{ call a http://{}/a; call b http://{}/b; timeout 5s; }} }} }}\n",
        a.addr(),
        b.addr()
    ));
    let c = Client::new();
    // Warm the connections, then time one aggregate.
    assert_eq!(c.get(&gw.url("/both")).status, 200);
    let t = Instant::now();
    let r = c.get(&gw.url("/both"));
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["a"]["v"], "a");
    assert_eq!(r.json()["b"]["v"], "b");
    // Sequential calls would take at least 800 ms.
    assert!(
        took >= delay && took < Duration::from_millis(700),
        "took {took:?}"
    );
}

#[test]
fn a_missing_or_non_scalar_field_fails_only_the_dependent_call() {
    let order = TestUpstream::with("order", |_| {
        Reply::json(serde_json::json!({"id": 1, "tags": ["x"]}))
    });
    let user = TestUpstream::start("user");
    let gw = Gateway::start(&format!(
        "access_log off;\nserver {{ listen @PORT@; location = /d {{ aggregate {{\n\
           call order http://{o}/orders/1;\n\
           call missing http://{u}/users/$order.userId;\n\
           call list http://{u}/users/$order.tags;\n\
           call ok http://{u}/users/$order.id;\n\
           on_error partial; }} }} }}\n",
        o = order.addr(),
        u = user.addr()
    ));
    let r = get(&gw.url("/d"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-aggregate-complete").as_deref(), Some("false"));
    let j = r.json();
    assert!(j["missing"].is_null());
    assert!(j["list"].is_null());
    assert!(!j["ok"].is_null());
    assert_eq!(
        user.count(),
        1,
        "only the call with a usable field went out"
    );
    assert_eq!(user.last().target, "/users/1");
    gw.wait_log("the reason of the failed call", |t| {
        t.contains("`order.userId` is missing")
    });
}

#[test]
fn calls_carry_the_locations_proxy_set_headers_and_an_empty_one_removes_its_header() {
    let up = TestUpstream::with("up", |_| Reply::json(serde_json::json!({"v": 1})));
    let gw = Gateway::start(&format!(
        "access_log off;\nserver {{ listen @PORT@; location = /agg {{\n\
           proxy_set_header X-Literal fixed;\n\
           proxy_set_header X-Method $request_method;\n\
           proxy_set_header X-Empty \"\";\n\
           aggregate {{ call a http://{a}/a; }} }}\n\
           location = /anonymous {{ proxy_set_header Authorization \"\";\n\
           aggregate {{ call a http://{a}/a; }} }} }}\n",
        a = up.addr()
    ));
    let c = Client::new();
    let r = c.request("GET", &gw.url("/agg"), &[("authorization", "Bearer t")], "");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.header("x-literal").as_deref(), Some("fixed"));
    assert_eq!(seen.header("x-method").as_deref(), Some("GET"));
    assert_eq!(seen.header("x-empty"), None);
    assert_eq!(seen.header("authorization").as_deref(), Some("Bearer t"));
    // An empty value removes even the header calls inherit.
    let r = c.request(
        "GET",
        &gw.url("/anonymous"),
        &[("authorization", "Bearer t")],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().header("authorization"), None);
}
