//! `tollgate demo` end to end. The demo binds fixed ports (services on
//! 3001-3003, the gateway on 8000); this is the only test that uses them.

mod util;

use util::*;

#[test]
fn demo_serves_users_and_order_details() {
    let mut gw = Gateway::demo();
    let c = Client::new();

    let r = c.get("http://127.0.0.1:8000/api/users/7");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"]["id"], 7, "users are wrapped");
    assert_eq!(
        r.json()["correlationId"].as_str(),
        r.header("x-correlation-id").as_deref()
    );
    assert_eq!(r.header("x-gateway").as_deref(), Some("tollgate"));

    // Orders need the token the demo prints.
    assert_eq!(c.get("http://127.0.0.1:8000/api/orders/42").status, 401);
    let token = tollgate::demo::demo_token();
    let r = c.request(
        "GET",
        "http://127.0.0.1:8000/api/orders/42",
        &[("authorization", &format!("Bearer {token}"))],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], 42);

    // Products are cached and limited: the sixth request is a 429.
    let statuses: Vec<u16> = (0..6)
        .map(|_| c.get("http://127.0.0.1:8000/api/products/3").status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    let r = c.get("http://127.0.0.1:8000/api/products/3");
    assert!(r.header("retry-after").is_some());

    let r = c.get("http://127.0.0.1:8000/api/order-details/42");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-aggregate-complete").as_deref(), Some("true"));
    let j = r.json();
    assert_eq!(j["order"]["id"], 42);
    assert_eq!(j["user"]["id"], j["order"]["userId"]);
    assert_eq!(j["product"]["id"], j["order"]["productId"]);

    let r = c.get("http://127.0.0.1:8000/health");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let r = c.get("http://127.0.0.1:8000/nope");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["status"], 404);

    assert_eq!(gw.terminate().code(), Some(0), "{}", gw.log());
}
