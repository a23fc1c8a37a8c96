//! The HTTP API contract through `app()` with `oneshot`: shapes, status
//! codes, and a clear JSON error for every kind of bad input.

use crate::support::TestGrid;
use kwq::api::ApiLimits;
use kwq::examples;
use serde_json::json;

fn assert_error(
    status: u16,
    body: &serde_json::Value,
    expected_status: u16,
    code: &str,
    mention: &str,
) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["error"]["code"], json!(code), "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(mention),
        "message {message:?} should mention {mention:?}"
    );
}

#[tokio::test]
async fn module_upload_is_content_addressed_and_validated() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    let bytes = std::fs::read(examples::NOOP).unwrap();
    let (status, first) = grid
        .call_raw("POST", "/v1/modules?name=noop", bytes.clone(), None)
        .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(
        first["id"],
        json!(kwq::model::ModuleId::of(&bytes).as_str())
    );
    assert_eq!(
        (first["kind"].clone(), first["size"].clone()),
        (json!("component"), json!(bytes.len()))
    );
    let (status, again) = grid.call_raw("POST", "/v1/modules", bytes, None).await;
    assert_eq!(
        (status, again["id"].clone(), again["name"].clone()),
        (200, first["id"].clone(), json!("noop"))
    );

    let (status, body) = grid
        .call_raw("POST", "/v1/modules", b"MZ this is an exe".to_vec(), None)
        .await;
    assert_error(status, &body, 400, "invalid_module", "not a WebAssembly");
    let (status, body) = grid.call_raw("POST", "/v1/modules", Vec::new(), None).await;
    assert_error(status, &body, 400, "invalid_module", "empty");
    let no_start = wat::parse_str(r#"(module (func (export "main")))"#).unwrap();
    let (status, body) = grid.call_raw("POST", "/v1/modules", no_start, None).await;
    assert_error(status, &body, 400, "invalid_module", "_start");
    // Checked at upload, before any compile: imports outside the sandbox,
    // a component that is not a task, and bytes that do not validate.
    let foreign = wat::parse_str(
        r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#,
    )
    .unwrap();
    let (status, body) = grid.call_raw("POST", "/v1/modules", foreign, None).await;
    assert_error(status, &body, 400, "invalid_module", "env::launch_missiles");
    let not_a_task = wat::parse_str("(component)").unwrap();
    let (status, body) = grid.call_raw("POST", "/v1/modules", not_a_task, None).await;
    assert_error(status, &body, 400, "invalid_module", "kwq:task/task");
    let mut truncated = std::fs::read(examples::NOOP).unwrap();
    truncated.truncate(1000);
    let (status, body) = grid.call_raw("POST", "/v1/modules", truncated, None).await;
    assert_error(
        status,
        &body,
        400,
        "invalid_module",
        "not a valid component",
    );

    let (status, list) = grid.call("GET", "/v1/modules", None).await;
    assert_eq!((status, list.as_array().unwrap().len()), (200, 1));
    let (status, by_name) = grid.call("GET", "/v1/modules/noop", None).await;
    assert_eq!((status, by_name["id"].clone()), (200, first["id"].clone()));
}

#[tokio::test]
async fn bad_task_submissions_get_a_4xx_json_error_naming_the_problem() {
    let grid = TestGrid::new(
        None,
        ApiLimits {
            other_bytes: 4096,
            ..ApiLimits::default()
        },
    )
    .await;
    grid.upload(examples::NOOP, "noop").await;
    let cases = [
        (json!({"module": "nope"}), 400, "unknown_module", "nope"),
        (
            json!({"module": "noop", "priority": 12}),
            400,
            "invalid_field",
            "priority",
        ),
        (
            json!({"module": "noop", "timeout_ms": -5}),
            400,
            "invalid_field",
            "timeout_ms",
        ),
        (
            json!({"module": "noop", "timeout_ms": 0}),
            400,
            "invalid_field",
            "timeout_ms",
        ),
        (
            json!({"module": "noop", "memory_bytes": 10}),
            400,
            "invalid_field",
            "memory_bytes",
        ),
        (
            json!({"module": "noop", "max_attempts": 0}),
            400,
            "invalid_field",
            "max_attempts",
        ),
        (
            json!({"module": "noop", "priorty": 3}),
            400,
            "invalid_field",
            "priorty",
        ),
        (
            json!({"module": "noop", "payload": 1, "payload_base64": "AA=="}),
            400,
            "invalid_field",
            "not both",
        ),
        (
            json!({"module": "noop", "payload_base64": "***"}),
            400,
            "invalid_field",
            "payload_base64",
        ),
        (json!({"payload": 1}), 400, "invalid_field", "module"),
        // Out of i64's range is the same mistake as out of the field's range.
        (
            json!({"module": "noop", "delay_ms": 1e30}),
            400,
            "invalid_field",
            "delay_ms",
        ),
    ];
    for (body, status, code, mention) in cases {
        let (got, response) = grid.call("POST", "/v1/tasks", Some(body.clone())).await;
        assert_error(got, &response, status, code, mention);
    }
    let (status, body) = grid
        .call_raw(
            "POST",
            "/v1/tasks",
            b"{\"module\": ".to_vec(),
            Some("application/json"),
        )
        .await;
    assert_error(status, &body, 400, "invalid_json", "");
    let (status, body) = grid
        .call_raw("POST", "/v1/tasks", b"{}".to_vec(), Some("text/plain"))
        .await;
    assert_error(status, &body, 415, "unsupported_media_type", "");
    let big = json!({"module": "noop", "payload": "x".repeat(10_000)});
    let (status, body) = grid.call("POST", "/v1/tasks", Some(big)).await;
    assert_error(status, &body, 413, "body_too_large", "");
    let (status, body) = grid
        .call_raw("POST", "/v1/modules", vec![0u8; 100 << 20], None)
        .await;
    assert_error(status, &body, 413, "body_too_large", "");
}

#[tokio::test]
async fn bad_job_submissions_and_lookups_are_4xx_json() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::NOOP, "noop").await;
    let sweep = json!({"params": {"x": [1, 2]}});
    let cases = [
        (json!({"module": "noop"}), "invalid_job", "exactly one"),
        (
            json!({"module": "noop", "payloads": [1], "sweep": sweep}),
            "invalid_job",
            "exactly one",
        ),
        (
            json!({"module": "noop", "payloads": []}),
            "invalid_job",
            "at least one",
        ),
        (
            json!({"module": "noop", "sweep": {"params": {"x": {"from": 5, "to": 1}}}}),
            "invalid_sweep",
            "x",
        ),
        (
            json!({"module": "noop", "sweep": {"base": 7, "params": {"x": [1]}}}),
            "invalid_sweep",
            "object",
        ),
        (
            json!({"module": "ghost", "payloads": [1]}),
            "unknown_module",
            "ghost",
        ),
    ];
    for (body, code, mention) in cases {
        let (status, response) = grid.call("POST", "/v1/jobs", Some(body)).await;
        assert_error(status, &response, 400, code, mention);
    }
    for path in [
        "/v1/tasks/t-missing",
        "/v1/jobs/j-missing",
        "/v1/jobs/j-missing/results",
        "/v1/nothing-here",
        "/v1/modules/ghost",
    ] {
        let (status, body) = grid.call("GET", path, None).await;
        assert!(status == 404 || status == 400, "{path}: {status}");
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
    }
    let (status, body) = grid.call("POST", "/v1/jobs/j-missing/pause", None).await;
    assert_error(status, &body, 404, "not_found", "j-missing");
    let (status, body) = grid.call("GET", "/v1/tasks?status=Sleeping", None).await;
    assert_error(status, &body, 400, "invalid_query", "Sleeping");
    let (status, body) = grid.call("GET", "/v1/tasks?limit=0", None).await;
    assert_error(status, &body, 400, "invalid_query", "limit");
    let (status, body) = grid.call("GET", "/v1/tasks?after=minus-one", None).await;
    assert_error(status, &body, 400, "invalid_query", "");
}

#[tokio::test]
async fn writes_need_the_bearer_token_when_one_is_set() {
    let grid = TestGrid::new(Some("s3cret"), ApiLimits::default()).await;
    let bytes = std::fs::read(examples::NOOP).unwrap();
    let (status, body) = grid
        .request("POST", "/v1/modules", bytes.clone(), None, None)
        .await;
    assert_error(status, &body, 401, "unauthorized", "Bearer");
    let (status, _) = grid
        .request("POST", "/v1/modules", bytes.clone(), None, Some("wrong"))
        .await;
    assert_eq!(status, 401);
    let (status, _) = grid
        .request("POST", "/v1/modules?name=noop", bytes, None, Some("s3cret"))
        .await;
    assert_eq!(status, 201);
    let (status, _) = grid
        .request("GET", "/v1/modules", Vec::new(), None, None)
        .await;
    assert_eq!(status, 200, "reads stay open");
}

#[tokio::test]
async fn tasks_are_listed_by_job_state_and_tag_in_pages() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::NOOP, "noop").await;
    let payloads: Vec<_> = (0..25).map(|i| json!(i)).collect();
    let (status, job) = grid
        .call("POST", "/v1/jobs", Some(json!({"module": "noop", "payloads": payloads, "tags": {"currency": "USD"}, "priority": 7})))
        .await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(
        (job["total"].clone(), job["counts"]["Pending"].clone()),
        (json!(25), json!(25))
    );
    let job_id = job["id"].as_str().unwrap();
    let (_, lone) = grid
        .call(
            "POST",
            "/v1/tasks",
            Some(json!({"module": "noop", "tags": {"currency": "EUR"}})),
        )
        .await;

    let mut seen = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let cursor = after.map(|a| format!("&after={a}")).unwrap_or_default();
        let (status, page) = grid
            .call(
                "GET",
                &format!("/v1/tasks?job={job_id}&status=Pending&limit=10{cursor}"),
                None,
            )
            .await;
        assert_eq!(status, 200);
        for item in page["items"].as_array().unwrap() {
            assert_eq!(item["options"]["priority"], json!(7));
            seen.push(item["id"].as_str().unwrap().to_string());
        }
        match page["next"].as_u64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("{job_id}.{i}")).collect();
    assert_eq!(seen, expected);

    let (_, usd) = grid
        .call("GET", "/v1/tasks?tag=currency=USD&limit=1000", None)
        .await;
    assert_eq!(usd["items"].as_array().unwrap().len(), 25);
    let (_, eur) = grid.call("GET", "/v1/tasks?tag=currency=EUR", None).await;
    assert_eq!(eur["items"][0]["id"], lone["id"]);

    let (_, stats) = grid.call("GET", "/v1/stats", None).await;
    assert_eq!(stats["counts"]["Pending"], json!(26));
    assert_eq!(stats["depth"][7], json!(25));
    let usd_counts = stats["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tag"] == json!("currency=USD"))
        .unwrap();
    assert_eq!(usd_counts["counts"]["Pending"], json!(25));
    let (status, task) = grid
        .call("GET", &format!("/v1/tasks/{job_id}.3"), None)
        .await;
    assert_eq!(
        (status, task["payload"].clone(), task["state"].clone()),
        (200, json!(3), json!("Pending"))
    );
    assert_eq!(task["timeline"][0]["state"], json!("Pending"));
}

#[tokio::test]
async fn healthz_answers() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    assert_eq!(
        grid.call("GET", "/healthz", None).await,
        (200, json!({"status": "ok"}))
    );
}

#[tokio::test]
async fn every_route_is_in_the_openapi_document_and_served() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    let (status, doc) = grid.call("GET", "/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    let documented: usize = paths
        .values()
        .map(|ops| ops.as_object().unwrap().len())
        .sum();
    assert_eq!(
        documented,
        kwq::api::ROUTES.len(),
        "the document has routes the router does not: {paths:?}"
    );
    for (method, path) in kwq::api::ROUTES {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "{method} {path} missing from /openapi.json"
        );
        if *path == "/v1/events" {
            continue; // a never-ending stream; served in tests/all/process.rs
        }
        let concrete = path.replace("{id}", "x");
        let (status, body) = grid.call(&method.to_uppercase(), &concrete, None).await;
        let fallback = body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("no endpoint at"));
        assert!(
            !fallback && status != 405,
            "{method} {path} is not routed: {status} {body}"
        );
    }
    let (status, page) = grid.call("GET", "/docs", None).await;
    assert_eq!(status, 200);
    assert!(
        page.as_str()
            .unwrap()
            .contains("/docs/swagger-ui-bundle.js")
    );
    let (status, bundle) = grid.call("GET", "/docs/swagger-ui-bundle.js", None).await;
    assert_eq!(status, 200);
    assert!(
        bundle.as_str().unwrap().len() > 1_000_000,
        "the vendored bundle is served whole"
    );
}

/// The OpenAPI document states the bounds the server enforces: at each
/// documented minimum and maximum a submission is accepted, one step
/// outside it is refused with 400, and the exclusions it documents are
/// refused too. So a generated client or a fuzzer sends what the server takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_request_schemas_state_the_bounds_the_server_enforces() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::NOOP, "noop").await;
    let (_, doc) = grid.call("GET", "/openapi.json", None).await;
    let options = &doc["components"]["schemas"]["SubmitOptions"]["properties"];
    for field in [
        "priority",
        "timeout_ms",
        "memory_bytes",
        "max_attempts",
        "delay_ms",
    ] {
        let (min, max) = (
            options[field]["minimum"]
                .as_i64()
                .unwrap_or_else(|| panic!("{field} has no minimum")),
            options[field]["maximum"]
                .as_i64()
                .unwrap_or_else(|| panic!("{field} has no maximum")),
        );
        for (value, accepted) in [(min, true), (max, true), (min - 1, false), (max + 1, false)] {
            let (status, body) = grid
                .call(
                    "POST",
                    "/v1/tasks",
                    Some(json!({"module": "noop", field: value, "priority": if field == "priority" { value } else { 0 }})),
                )
                .await;
            if accepted {
                assert_eq!(status, 201, "{field}={value}: {body}");
            } else {
                assert_error(status, &body, 400, "invalid_field", field);
            }
        }
    }
    // Exclusions stated in the document, refused by the server.
    let task = &doc["components"]["schemas"]["TaskSubmission"]["allOf"];
    assert!(
        task.to_string()
            .contains(r#"{"not":{"required":["payload","payload_base64"]}}"#),
        "{task}"
    );
    let (status, body) = grid
        .call(
            "POST",
            "/v1/tasks",
            Some(json!({"module": "noop", "payload": 1, "payload_base64": "AQ=="})),
        )
        .await;
    assert_error(status, &body, 400, "invalid_field", "payload");
    let job = &doc["components"]["schemas"]["JobSubmission"];
    assert!(job.to_string().contains("oneOf"), "{job}");
    let (status, body) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "noop", "payloads": [1], "sweep": {"params": {"x": [1]}}})),
        )
        .await;
    assert_error(status, &body, 400, "invalid_job", "exactly one");
    assert_eq!(job["unevaluatedProperties"], json!(false));
    let (status, body) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "noop", "payloads": [1], "priorty": 3})),
        )
        .await;
    assert_error(status, &body, 400, "invalid_field", "priorty");
    // Page sizes: the documented range of `limit`, on both listings.
    for path in ["/v1/tasks", "/v1/jobs"] {
        let limit = doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == json!("limit"))
            .unwrap_or_else(|| panic!("{path} documents no limit"))["schema"]
            .clone();
        let (min, max) = (
            limit["minimum"].as_i64().unwrap(),
            limit["maximum"].as_i64().unwrap(),
        );
        for (value, ok) in [(min, true), (max, true), (min - 1, false), (max + 1, false)] {
            let (status, body) = grid
                .call("GET", &format!("{path}?limit={value}"), None)
                .await;
            if ok {
                assert_eq!(status, 200, "{path}?limit={value}: {body}");
            } else {
                assert_error(status, &body, 400, "invalid_query", "limit");
            }
        }
    }
}
