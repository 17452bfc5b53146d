//! Client authentication and channel authorization: who may read which channel, over SSE and WS.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_server::auth::SubscribeRule;
use herald_server::config::NamespaceConfig;
use jsonwebtoken::{EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Server, Sse, Ws, client, error_code};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn token_with(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes())).expect("token")
}

fn token(sub: &str) -> String {
    token_with(SECRET, json!({"sub": sub, "exp": now() + 600}))
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

async fn secured() -> Server {
    Server::with(|config| {
        config.jwt_hs256_secret = Some(SECRET.into());
        config.namespaces.insert(
            "news".into(),
            NamespaceConfig { subscribe: Some(SubscribeRule::Public), ..NamespaceConfig::default() },
        );
        config.namespaces.insert(
            "room".into(),
            NamespaceConfig { subscribe: Some(SubscribeRule::Authenticated), ..NamespaceConfig::default() },
        );
    })
    .await
}

async fn sse_status(server: &Server, query: &str, bearer: Option<&str>) -> (StatusCode, Value) {
    let mut request = client().get(server.url(&format!("/v1/sse?{query}")));
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = request.send().await.expect("GET /v1/sse");
    let status = response.status();
    if status == StatusCode::OK {
        return (status, Value::Null);
    }
    (status, serde_json::from_str(&response.text().await.unwrap_or_default()).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_user_reads_only_their_own_channel_over_sse() {
    let server = secured().await;
    let alice = token("alice");
    assert_eq!(sse_status(&server, "channel=user:alice", Some(&alice)).await.0, StatusCode::OK);
    assert_eq!(sse_status(&server, &format!("channel=user:alice&token={alice}"), None).await.0, StatusCode::OK);
    let (status, body) = sse_status(&server, "channel=user:bob", Some(&alice)).await;
    assert_eq!((status, error_code(&body)), (StatusCode::FORBIDDEN, "forbidden"));
    let (status, body) = sse_status(&server, "channel=user:alice&channel=user:bob", Some(&alice)).await;
    assert_eq!((status, error_code(&body)), (StatusCode::FORBIDDEN, "forbidden"), "one forbidden channel refuses all");
    // A namespace without a rule is reachable only through the channels claim.
    assert_eq!(sse_status(&server, "channel=order:1", Some(&alice)).await.0, StatusCode::FORBIDDEN);
    let granted = token_with(
        SECRET,
        json!({"sub": "alice", "exp": now() + 600, "channels": ["order:1", "team:red:*", "user:bob"]}),
    );
    for channel in ["order:1", "team:red:general", "user:bob"] {
        assert_eq!(
            sse_status(&server, &format!("channel={channel}"), Some(&granted)).await.0,
            StatusCode::OK,
            "{channel}"
        );
    }
    assert_eq!(sse_status(&server, "channel=order:2", Some(&granted)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(sse_status(&server, "channel=team:blue:x", Some(&granted)).await.0, StatusCode::FORBIDDEN);
    // Public and authenticated namespaces.
    assert_eq!(sse_status(&server, "channel=news:today", None).await.0, StatusCode::OK);
    assert_eq!(sse_status(&server, "channel=room:1", Some(&alice)).await.0, StatusCode::OK);
    let (status, body) = sse_status(&server, "channel=room:1", None).await;
    assert_eq!((status, error_code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"));
}

#[tokio::test]
async fn bad_tokens_are_refused_never_treated_as_anonymous() {
    let server = secured().await;
    let expired = token_with(SECRET, json!({"sub": "alice", "exp": now() - 10}));
    let other_key = token_with("another-secret-another-secret-another", json!({"sub": "alice", "exp": now() + 600}));
    let none_alg = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(format!(r#"{{"sub":"alice","exp":{}}}"#, now() + 600).as_bytes())
    );
    let good = token("alice");
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    parts[1] = base64url(format!(r#"{{"sub":"bob","exp":{}}}"#, now() + 600).as_bytes());
    let tampered = parts.join(".");
    let no_sub = token_with(SECRET, json!({"exp": now() + 600}));
    // RFC 7515 section 4.1.11: an extension the receiver does not understand makes the token invalid.
    let critical = |crit: &[&str], extra: Value| {
        let header = Header { crit: Some(crit.iter().map(|c| (*c).to_owned()).collect()), ..Header::default() };
        let mut claims = json!({"sub": "alice", "exp": now() + 600});
        for (key, value) in extra.as_object().into_iter().flatten() {
            claims[key] = value.clone();
        }
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET.as_bytes())).expect("token")
    };
    let crit_exp = critical(&["exp"], json!({}));
    let crit_custom = critical(&["x-policy"], json!({"x-policy": "strict"}));
    for (name, bad) in [
        ("expired", &expired),
        ("crit naming a registered claim", &crit_exp),
        ("crit naming an extension", &crit_custom),
        ("other key", &other_key),
        ("alg none", &none_alg),
        ("tampered", &tampered),
        ("no sub", &no_sub),
        ("garbage", &"not.a.token".to_owned()),
    ] {
        // Even on a public channel, a bad token is an error, not an anonymous pass.
        for channel in ["user:alice", "news:today"] {
            let (status, body) = sse_status(&server, &format!("channel={channel}"), Some(bad)).await;
            assert_eq!(
                (status, error_code(&body)),
                (StatusCode::UNAUTHORIZED, "unauthenticated"),
                "{name} on {channel}"
            );
        }
        let upgrade = tokio_tungstenite::connect_async(format!("{}?token={bad}", server.ws_url())).await;
        assert!(upgrade.is_err(), "{name}: WS upgrade must be refused");
    }
    let (status, body) = sse_status(&server, "channel=user:alice", None).await;
    assert_eq!((status, error_code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"));
}

#[tokio::test]
async fn websocket_subscriptions_are_authorized_one_by_one() {
    let server = secured().await;
    let (socket, _) = tokio_tungstenite::connect_async(format!("{}?token={}", server.ws_url(), token("carol")))
        .await
        .expect("WS with a token");
    let mut ws = Ws { socket };
    assert_eq!(ws.subscribe(1, "user:carol", None).await.last().map(|f| f["type"].clone()), Some(json!("subscribed")));
    let refused = ws.subscribe(2, "user:dave", None).await;
    assert_eq!((refused[0]["type"].as_str(), refused[0]["code"].as_str()), (Some("error"), Some("forbidden")));
    let (_, presence) = server.get("/v1/presence?channel=user:carol").await;
    assert_eq!(presence["connections"][0]["user"], "carol");
}

#[tokio::test]
async fn a_connection_closes_when_its_token_expires_unless_refreshed() {
    let server = secured().await;
    let short = token_with(SECRET, json!({"sub": "erin", "exp": now() + 2}));
    let response = client()
        .get(server.url("/v1/sse?channel=user:erin"))
        .header("authorization", format!("Bearer {short}"))
        .send()
        .await
        .expect("SSE");
    let text =
        tokio::time::timeout(Duration::from_secs(10), response.text()).await.expect("stream ends").expect("body");
    assert!(text.contains(": closed token_expired"), "{text}");

    // That token is expired now (SSE ended at its `exp`): the WebSocket gets a short one of its own.
    let short = token_with(SECRET, json!({"sub": "erin", "exp": now() + 2}));
    let (socket, _) =
        tokio_tungstenite::connect_async(format!("{}?token={}", server.ws_url(), short)).await.expect("WS");
    let mut ws = Ws { socket };
    let (code, reason) = ws.close_frame().await;
    assert_eq!((code, reason.as_str()), (4003, "token_expired"));

    let short = token_with(SECRET, json!({"sub": "erin", "exp": now() + 2}));
    let (socket, _) =
        tokio_tungstenite::connect_async(format!("{}?token={}", server.ws_url(), short)).await.expect("WS");
    let mut ws = Ws { socket };
    let fresh = token_with(SECRET, json!({"sub": "erin", "exp": now() + 600}));
    ws.send(json!({"op": "refresh", "id": 1, "token": fresh})).await;
    assert_eq!(ws.next().await["type"], "refreshed");
    ws.send(json!({"op": "refresh", "id": 2, "token": token("mallory")})).await;
    assert_eq!(ws.next().await["code"], "forbidden", "a refresh cannot switch users");
    tokio::time::sleep(Duration::from_secs(3)).await;
    ws.send(json!({"op": "ping", "id": 3})).await;
    assert_eq!(ws.next().await, json!({"type": "pong", "id": 3}), "still open after the first token's expiry");
}

#[tokio::test]
async fn a_token_is_expired_from_the_first_instant_of_its_exp_second() {
    let server = secured().await;
    // `now()` only grows, so a token made with `exp = now()` is at or past its expiry when checked.
    let expiring = || token_with(SECRET, json!({"sub": "hal", "exp": now()}));
    let (status, body) = sse_status(&server, "channel=user:hal", Some(&expiring())).await;
    assert_eq!((status, error_code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"), "SSE: {body}");
    assert_eq!(body["error"]["message"], "token expired");
    let refused = tokio_tungstenite::connect_async(format!("{}?token={}", server.ws_url(), expiring())).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(response)) = refused else {
        panic!("a WebSocket upgrade with a token at its exp second must be refused with an HTTP answer")
    };
    assert_eq!(response.status().as_u16(), 401);

    // A refresh to such a token is refused and keeps the connection on its current one.
    let (socket, _) =
        tokio_tungstenite::connect_async(format!("{}?token={}", server.ws_url(), token("hal"))).await.expect("WS");
    let mut ws = Ws { socket };
    ws.send(json!({"op": "refresh", "id": 1, "token": expiring()})).await;
    let reply = ws.next().await;
    assert_eq!((reply["type"].as_str(), reply["code"].as_str()), (Some("error"), Some("unauthenticated")), "{reply}");
    assert_eq!(reply["id"], 1);
    ws.send(json!({"op": "ping", "id": 2})).await;
    assert_eq!(ws.next().await, json!({"type": "pong", "id": 2}));
}

#[tokio::test]
async fn a_token_in_both_the_header_and_the_query_is_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server = secured().await;
    let (alice, bob) = (token("alice"), token("bob"));
    for query_token in [&alice, &bob, &"garbage".to_owned()] {
        let (status, body) =
            sse_status(&server, &format!("channel=user:alice&token={query_token}"), Some(&alice)).await;
        assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_request"), "SSE: {body}");
        let mut request = format!("{}?token={query_token}", server.ws_url()).into_client_request().expect("WS request");
        request.headers_mut().insert("authorization", format!("Bearer {alice}").parse().expect("header value"));
        let refused = tokio_tungstenite::connect_async(request).await;
        let Err(tokio_tungstenite::tungstenite::Error::Http(response)) = refused else {
            panic!("a WebSocket upgrade with two tokens must be refused with an HTTP answer")
        };
        assert_eq!(response.status().as_u16(), 400);
        let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).expect("JSON");
        assert_eq!(error_code(&body), "bad_request");
    }
    // Either place alone still works.
    assert_eq!(sse_status(&server, "channel=user:alice", Some(&alice)).await.0, StatusCode::OK);
    assert_eq!(sse_status(&server, &format!("channel=user:alice&token={alice}"), None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn the_server_api_and_sse_tokens_are_separate_credentials() {
    let server = Server::with(|config| {
        config.jwt_hs256_secret = Some(SECRET.into());
        config.api_keys = vec!["k".repeat(32)];
    })
    .await;
    let (sse, _) = Sse::open(&server, &format!("channel=user:frank&token={}", token("frank")), None).await;
    drop(sse);
    let response = client()
        .post(server.url("/v1/publish"))
        .header("authorization", format!("Bearer {}", token("frank")))
        .json(&json!({"channel": "user:frank", "data": 1}))
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "a client token is not an API key");
}

#[test]
fn serving_other_machines_without_authentication_needs_insecure() {
    let open = herald_server::Cli { listen: Some("0.0.0.0:0".into()), ..herald_server::Cli::default() };
    let problems = herald_server::config::load(&open, &[]).expect_err("refused");
    assert!(problems.iter().any(|p| p.contains("--insecure")), "{problems:?}");
    let insecure = herald_server::Cli { insecure: true, ..open };
    assert!(herald_server::config::load(&insecure, &[]).is_ok());
    let secured = herald_server::Cli { listen: Some("0.0.0.0:0".into()), ..herald_server::Cli::default() };
    let env =
        vec![("HERALD_JWT_HS256_SECRET".to_owned(), SECRET.to_owned()), ("HERALD_API_KEYS".to_owned(), "a".repeat(32))];
    assert!(herald_server::config::load(&secured, &env).is_ok());
}

/// Runs `openssl` in `dir`; panics with a clear message when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) -> String {
    let output =
        std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn hex_to_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2).filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()).collect()
}

#[tokio::test]
async fn asymmetric_keys_and_jwk_sets_verify_tokens() {
    let dir = std::env::temp_dir().join(format!("herald-keys-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).expect("dir");
    for (name, args) in [
        ("rsa", vec!["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
        ("other", vec!["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
        ("ec", vec!["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        ("ed", vec!["-algorithm", "ed25519"]),
    ] {
        let key = format!("{name}.key");
        let mut full = vec!["genpkey"];
        full.extend(args);
        full.extend(["-out", key.as_str()]);
        openssl(&dir, &full);
        openssl(&dir, &["pkey", "-in", &key, "-pubout", "-out", &format!("{name}.pub")]);
    }
    // A JWK set with the "other" RSA key under kid "k2".
    let modulus = openssl(&dir, &["rsa", "-pubin", "-in", "other.pub", "-noout", "-modulus"]);
    let modulus = hex_to_bytes(modulus.trim().trim_start_matches("Modulus="));
    let jwks = json!({"keys": [{"kty": "RSA", "alg": "RS256", "kid": "k2", "use": "sig", "n": base64url(&modulus), "e": "AQAB"}]});
    std::fs::write(dir.join("jwks.json"), jwks.to_string()).expect("jwks");
    let paths = dir.clone();
    let server = Server::with(move |config| {
        config.jwt_rs256_public_key_file = Some(paths.join("rsa.pub"));
        config.jwt_es256_public_key_file = Some(paths.join("ec.pub"));
        config.jwt_eddsa_public_key_file = Some(paths.join("ed.pub"));
        config.jwt_jwks_file = Some(paths.join("jwks.json"));
    })
    .await;
    let read = |name: &str| std::fs::read(dir.join(name)).expect("key file");
    let claims = json!({"sub": "zoe", "exp": now() + 600});
    let sign = |algorithm: jsonwebtoken::Algorithm, key: EncodingKey, kid: Option<&str>| {
        let mut header = Header::new(algorithm);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims, &key).expect("sign")
    };
    use jsonwebtoken::Algorithm::{ES256, EdDSA, HS256, RS256};
    let accepted = [
        ("RS256", sign(RS256, EncodingKey::from_rsa_pem(&read("rsa.key")).expect("rsa"), None)),
        ("ES256", sign(ES256, EncodingKey::from_ec_pem(&read("ec.key")).expect("ec"), None)),
        ("EdDSA", sign(EdDSA, EncodingKey::from_ed_pem(&read("ed.key")).expect("ed"), None)),
        ("JWKS k2", sign(RS256, EncodingKey::from_rsa_pem(&read("other.key")).expect("other"), Some("k2"))),
    ];
    for (name, token) in &accepted {
        assert_eq!(sse_status(&server, "channel=user:zoe", Some(token)).await.0, StatusCode::OK, "{name}");
    }
    let refused = [
        (
            "JWKS key under another kid",
            sign(RS256, EncodingKey::from_rsa_pem(&read("other.key")).expect("other"), Some("k9")),
        ),
        ("HS256 keyed with the public key", sign(HS256, EncodingKey::from_secret(&read("rsa.pub")), None)),
    ];
    for (name, token) in &refused {
        let (status, body) = sse_status(&server, "channel=user:zoe", Some(token)).await;
        assert_eq!((status, error_code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"), "{name}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The status and error code of an SSE request with `token` as a bearer (`None` for 200).
async fn sse_refusal(server: &Server, token: &str) -> Option<(StatusCode, String)> {
    let (status, body) = sse_status(server, "channel=user:ann", Some(token)).await;
    (status != StatusCode::OK).then(|| (status, error_code(&body).to_owned()))
}

#[tokio::test]
async fn not_before_issued_at_audience_and_issuer_are_checked() {
    let server = Server::with(|config| {
        config.jwt_hs256_secret = Some(SECRET.into());
        config.jwt_audience = Some("herald".into());
        config.jwt_issuer = Some("https://auth.example".into());
        config.jwt_leeway_secs = 30;
    })
    .await;
    let claims = |extra: Value| {
        let mut claims = json!({"sub": "ann", "exp": now() + 600, "aud": "herald", "iss": "https://auth.example"});
        for (key, value) in extra.as_object().into_iter().flatten() {
            if value.is_null() {
                claims.as_object_mut().map(|c| c.remove(key));
            } else {
                claims[key] = value.clone();
            }
        }
        token_with(SECRET, claims)
    };
    let unauthenticated = Some((StatusCode::UNAUTHORIZED, "unauthenticated".to_owned()));
    let cases = [
        ("plain", json!({}), None),
        ("nbf tomorrow", json!({"nbf": now() + 86_400}), unauthenticated.clone()),
        ("nbf within the leeway", json!({"nbf": now() + 10}), None),
        ("nbf passed", json!({"nbf": now() - 10}), None),
        ("iat in the future", json!({"iat": now() + 3600}), unauthenticated.clone()),
        ("iat within the leeway", json!({"iat": now() + 10}), None),
        ("nbf not a number", json!({"nbf": "tomorrow"}), unauthenticated.clone()),
        ("audience in a list", json!({"aud": ["other", "herald"]}), None),
        ("another audience", json!({"aud": "billing"}), unauthenticated.clone()),
        ("no audience", json!({"aud": null}), unauthenticated.clone()),
        ("another issuer", json!({"iss": "https://evil.example"}), unauthenticated.clone()),
        ("no issuer", json!({"iss": null}), unauthenticated.clone()),
        // RFC 7519 section 4.1.1: `iss` is one StringOrURI; a list is refused even if it names the issuer.
        ("issuer in a list", json!({"iss": ["https://evil.example", "https://auth.example"]}), unauthenticated.clone()),
        ("issuer alone in a list", json!({"iss": ["https://auth.example"]}), unauthenticated.clone()),
        ("issuer not a string", json!({"iss": 7}), unauthenticated.clone()),
    ];
    for (name, extra, expected) in cases {
        let token = claims(extra);
        assert_eq!(sse_refusal(&server, &token).await, expected, "SSE: {name}");
        let upgrade = tokio_tungstenite::connect_async(format!("{}?token={token}", server.ws_url())).await;
        assert_eq!(upgrade.is_ok(), expected.is_none(), "WS: {name}");
    }

    // Without a configured audience, a token naming any audience is refused; one naming none is fine.
    let server = secured().await;
    let with_aud = token_with(SECRET, json!({"sub": "ann", "exp": now() + 600, "aud": "herald"}));
    let (status, body) = sse_status(&server, "channel=user:ann", Some(&with_aud)).await;
    assert_eq!((status, error_code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"));
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("jwt_audience")), "{body}");
    assert_eq!(sse_status(&server, "channel=user:ann", Some(&token("ann"))).await.0, StatusCode::OK);
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_a_token_is_given_once() {
    let server = Server::with(|config| {
        config.jwt_hs256_secret = Some(SECRET.into());
        config.api_keys = vec!["k".repeat(32)];
    })
    .await;
    let ann = token("ann");
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let response = client()
            .get(server.url("/v1/sse?channel=user:ann"))
            .header("authorization", format!("{scheme} {ann}"))
            .send()
            .await
            .expect("SSE");
        assert_eq!(response.status(), StatusCode::OK, "SSE with {scheme}");
        let response = client()
            .post(server.url("/v1/publish"))
            .header("authorization", format!("{scheme} {}", "k".repeat(32)))
            .json(&json!({"channel": "a", "data": 1}))
            .send()
            .await
            .expect("publish");
        assert_eq!(response.status(), StatusCode::OK, "API key with {scheme}");
    }
    for bad in [format!("Basic {ann}"), format!("Bearer{ann}"), "Bearer ".to_owned()] {
        let (status, body) = sse_status_with_header(&server, &bad).await;
        assert_eq!((status, error_code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"), "{bad}");
    }
    let twice = format!("channel=user:ann&token={ann}&token={ann}");
    let (status, body) = sse_status(&server, &twice, None).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_request"));
    let refused = tokio_tungstenite::connect_async(format!("{}?token={ann}&token={ann}", server.ws_url())).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(response)) = refused else {
        panic!("a WebSocket upgrade with two tokens must be refused with an HTTP answer")
    };
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).expect("JSON");
    assert_eq!(error_code(&body), "bad_request");
}

async fn sse_status_with_header(server: &Server, authorization: &str) -> (StatusCode, Value) {
    let response = client()
        .get(server.url("/v1/sse?channel=user:ann"))
        .header("authorization", authorization)
        .send()
        .await
        .expect("SSE");
    let status = response.status();
    (status, serde_json::from_str(&response.text().await.unwrap_or_default()).unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_event_stream_really_ends_when_its_token_expires() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = secured().await;
    let expires = now() + 2;
    let short = token_with(SECRET, json!({"sub": "gil", "exp": expires}));
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    let request = format!("GET /v1/sse?channel=user:gil&token={short} HTTP/1.1\r\nHost: x\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("request");
    // The server closes the socket itself (read_to_end ends), not before the token's expiry.
    let mut stream = Vec::new();
    tokio::time::timeout(crate::harness::TIMEOUT, socket.read_to_end(&mut stream))
        .await
        .expect("the server ends the stream")
        .expect("read");
    assert!(now() >= expires, "closed before the token expired");
    let text = String::from_utf8_lossy(&stream);
    assert!(text.ends_with(": closed token_expired\n\n"), "{text}");
    let hub = server.state.hub();
    crate::harness::eventually("the expired connection left", || hub.connection_count() == 0).await;
    let (_, presence) = server.get("/v1/presence?channel=user:gil").await;
    assert_eq!(presence["connections"], json!([]));
}
