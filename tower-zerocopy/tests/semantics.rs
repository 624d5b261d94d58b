//! HTTP semantics of `ServeDir`/`ServeFile`, driven through the service directly.

mod support;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use support::TempDir;
use tower::ServiceExt;
use tower_zerocopy::{ServeDir, ServeFile};

async fn call(
    svc: &ServeDir,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
) -> (StatusCode, HeaderMap, Bytes) {
    let mut req = Request::builder().method(method.clone()).uri(path);
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let res = svc.clone().oneshot(req.body(()).unwrap()).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    if let Some(len) = parts.headers.get(header::CONTENT_LENGTH) {
        if method != Method::HEAD {
            assert_eq!(
                len.to_str().unwrap(),
                body.len().to_string(),
                "{path} {headers:?}"
            );
        }
    }
    (parts.status, parts.headers, body)
}

fn content() -> Vec<u8> {
    (0..100u8).collect()
}

#[tokio::test]
async fn preconditions_and_ranges_table() {
    let dir = TempDir::new("table");
    std::fs::write(dir.path().join("a.txt"), content()).unwrap();
    let svc = ServeDir::new(dir.path());
    let (_, h, _) = call(&svc, Method::GET, "/a.txt", &[]).await;
    let etag = h[header::ETAG].to_str().unwrap().to_owned();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong etag: {etag}"
    );
    let lm = h[header::LAST_MODIFIED].to_str().unwrap().to_owned();
    let lm_time = httpdate::parse_http_date(&lm).unwrap();
    let past = httpdate::fmt_http_date(lm_time - Duration::from_secs(86_400));
    let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(86_400));
    let weak = format!("W/{etag}");
    let thousand = format!(
        "bytes={}",
        (0..1000)
            .map(|i| format!("{i}-{i}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let s = |x: &str| x.to_owned();

    // (method, headers, status, Content-Range, body range)
    type Case = (
        Method,
        Vec<(&'static str, String)>,
        u16,
        Option<&'static str>,
        Option<(usize, usize)>,
    );
    let full = Some((0, 100));
    let cases: Vec<Case> = vec![
        (Method::GET, vec![], 200, None, full),
        (
            Method::GET,
            vec![("if-match", etag.clone())],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("if-match", s("\"nope\""))],
            412,
            None,
            None,
        ),
        (Method::GET, vec![("if-match", s("*"))], 200, None, full),
        (
            Method::GET,
            vec![("if-match", weak.clone())],
            412,
            None,
            None,
        ),
        (
            Method::GET,
            vec![("if-match", format!("\"x\", {etag}"))],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("if-unmodified-since", lm.clone())],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("if-unmodified-since", past.clone())],
            412,
            None,
            None,
        ),
        (
            Method::GET,
            vec![("if-unmodified-since", s("garbage"))],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![
                ("if-match", etag.clone()),
                ("if-unmodified-since", past.clone()),
            ],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("if-none-match", etag.clone())],
            304,
            None,
            Some((0, 0)),
        ),
        (
            Method::GET,
            vec![("if-none-match", weak.clone())],
            304,
            None,
            Some((0, 0)),
        ),
        (
            Method::GET,
            vec![("if-none-match", s("\"nope\""))],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("if-none-match", s("*"))],
            304,
            None,
            Some((0, 0)),
        ),
        (
            Method::HEAD,
            vec![("if-none-match", etag.clone())],
            304,
            None,
            Some((0, 0)),
        ),
        (
            Method::GET,
            vec![("if-modified-since", lm.clone())],
            304,
            None,
            Some((0, 0)),
        ),
        (
            Method::GET,
            vec![("if-modified-since", future.clone())],
            304,
            None,
            Some((0, 0)),
        ),
        (
            Method::GET,
            vec![("if-modified-since", past.clone())],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("if-modified-since", s("garbage"))],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![
                ("if-none-match", s("\"nope\"")),
                ("if-modified-since", lm.clone()),
            ],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("if-match", s("\"nope\"")), ("if-none-match", etag.clone())],
            412,
            None,
            None,
        ),
        (
            Method::GET,
            vec![("range", s("bytes=0-9"))],
            206,
            Some("bytes 0-9/100"),
            Some((0, 10)),
        ),
        (
            Method::GET,
            vec![("range", s("bytes=-10"))],
            206,
            Some("bytes 90-99/100"),
            Some((90, 100)),
        ),
        (
            Method::GET,
            vec![("range", s("bytes=90-"))],
            206,
            Some("bytes 90-99/100"),
            Some((90, 100)),
        ),
        (
            Method::GET,
            vec![("range", s("bytes=99-200"))],
            206,
            Some("bytes 99-99/100"),
            Some((99, 100)),
        ),
        (
            Method::GET,
            vec![("range", s("bytes=100-"))],
            416,
            Some("bytes */100"),
            Some((0, 0)),
        ),
        (
            Method::GET,
            vec![("range", s("bytes=-0"))],
            416,
            Some("bytes */100"),
            Some((0, 0)),
        ),
        (
            Method::GET,
            vec![("range", s("bytes=99999999999999999999999-"))],
            416,
            Some("bytes */100"),
            Some((0, 0)),
        ),
        (
            Method::GET,
            vec![("range", s("bytes=0-99999999999999999999999"))],
            206,
            Some("bytes 0-99/100"),
            full,
        ),
        (
            Method::GET,
            vec![("range", s("bytes=-99999999999999999999999"))],
            206,
            Some("bytes 0-99/100"),
            full,
        ),
        (Method::GET, vec![("range", s("bytes="))], 200, None, full),
        (
            Method::GET,
            vec![("range", s("bytes=5-2"))],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("range", s("bytes=a-b"))],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("range", s("items=0-1"))],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("range", thousand.clone())],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("range", s("bytes=0-5,3-9"))],
            206,
            Some("bytes 0-9/100"),
            Some((0, 10)),
        ),
        (
            Method::GET,
            vec![("range", s("bytes=0-9")), ("if-range", etag.clone())],
            206,
            Some("bytes 0-9/100"),
            Some((0, 10)),
        ),
        (
            Method::GET,
            vec![("range", s("bytes=0-9")), ("if-range", weak.clone())],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("range", s("bytes=0-9")), ("if-range", s("\"nope\""))],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("range", s("bytes=0-9")), ("if-range", lm.clone())],
            206,
            Some("bytes 0-9/100"),
            Some((0, 10)),
        ),
        (
            Method::GET,
            vec![("range", s("bytes=0-9")), ("if-range", past.clone())],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("range", s("bytes=0-9")), ("if-range", s("garbage"))],
            200,
            None,
            full,
        ),
        (
            Method::GET,
            vec![("range", s("bytes=0-9")), ("if-none-match", etag.clone())],
            304,
            None,
            Some((0, 0)),
        ),
        (
            Method::GET,
            vec![("range", s("bytes=0-9")), ("if-match", s("\"nope\""))],
            412,
            None,
            None,
        ),
        (
            Method::HEAD,
            vec![("range", s("bytes=0-9"))],
            200,
            None,
            Some((0, 0)),
        ),
        (Method::HEAD, vec![], 200, None, Some((0, 0))),
    ];
    let data = content();
    for (i, (method, headers, want, want_cr, want_body)) in cases.into_iter().enumerate() {
        let (status, h, body) = call(&svc, method.clone(), "/a.txt", &headers).await;
        let ctx = format!("case {i}: {method} {headers:?}");
        assert_eq!(status.as_u16(), want, "{ctx}");
        assert_eq!(
            h.get(header::CONTENT_RANGE).map(|v| v.to_str().unwrap()),
            want_cr,
            "{ctx}"
        );
        if let Some((a, b)) = want_body {
            assert_eq!(&body[..], &data[a..b], "{ctx}");
        }
        if want == 200 || want == 206 || want == 304 {
            assert_eq!(h[header::ETAG], etag.as_str(), "{ctx}");
            assert_eq!(h[header::LAST_MODIFIED], lm.as_str(), "{ctx}");
        }
        if want == 200 || want == 206 {
            assert_eq!(h[header::ACCEPT_RANGES], "bytes", "{ctx}");
        }
        if method == Method::HEAD && want == 200 {
            assert_eq!(h[header::CONTENT_LENGTH], "100", "{ctx}");
        }
    }
}

#[tokio::test]
async fn multipart_byteranges_are_exact() {
    let dir = TempDir::new("multi");
    std::fs::write(dir.path().join("a.txt"), content()).unwrap();
    let svc = ServeDir::new(dir.path());
    let (status, h, body) = call(
        &svc,
        Method::GET,
        "/a.txt",
        &[("range", "bytes=0-1, 50-52, -3".into())],
    )
    .await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    let ct = h[header::CONTENT_TYPE].to_str().unwrap();
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .expect(ct);
    let body = body.to_vec();
    let mut expected = Vec::new();
    for (i, (a, b)) in [(0usize, 2usize), (50, 53), (97, 100)]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            expected.extend_from_slice(b"\r\n");
        }
        expected.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: text/plain\r\nContent-Range: bytes {a}-{}/100\r\n\r\n", b - 1).as_bytes(),
        );
        expected.extend_from_slice(&content()[a..b]);
    }
    expected.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    assert_eq!(body, expected);
    // The cap: more ranges than allowed → the whole file.
    let capped = ServeDir::new(dir.path()).max_ranges(2);
    let (status, _, body) = call(
        &capped,
        Method::GET,
        "/a.txt",
        &[("range", "bytes=0-1,5-6,9-10".into())],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 100);
}

#[tokio::test]
async fn content_type_index_redirect_hidden_cache_control_methods() {
    let dir = TempDir::new("misc");
    std::fs::create_dir_all(dir.path().join("docs")).unwrap();
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    std::fs::write(dir.path().join("docs/index.html"), "<h1>hi</h1>").unwrap();
    std::fs::write(dir.path().join("style.css"), "b{}").unwrap();
    std::fs::write(dir.path().join("data.unknownext"), "x").unwrap();
    std::fs::write(dir.path().join(".env"), "SECRET").unwrap();
    std::fs::write(dir.path().join("index.html"), "root").unwrap();
    let svc = ServeDir::new(dir.path()).cache_control("public, max-age=60".parse().unwrap());

    let (st, h, body) = call(&svc, Method::GET, "/docs/", &[]).await;
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"<h1>hi</h1>"[..]));
    assert_eq!(h[header::CONTENT_TYPE], "text/html");
    assert_eq!(h[header::CACHE_CONTROL], "public, max-age=60");
    for root in ["/", "/.", "//.", "/%2e"] {
        let (st, _, body) = call(&svc, Method::GET, root, &[]).await;
        assert_eq!((st, &body[..]), (StatusCode::OK, &b"root"[..]), "{root}");
    }
    let (st, h, _) = call(&svc, Method::GET, "/docs?x=1", &[]).await;
    assert_eq!(st, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(h[header::LOCATION], "docs/?x=1");
    let (st, h, _) = call(&svc, Method::GET, "//docs", &[]).await;
    assert_eq!(st, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        h[header::LOCATION],
        "docs/",
        "never a protocol-relative //host redirect"
    );
    let (st, _, _) = call(&svc, Method::GET, "/empty/", &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, h, _) = call(&svc, Method::GET, "/style.css", &[]).await;
    assert_eq!(h[header::CONTENT_TYPE], "text/css");
    let (_, h, _) = call(&svc, Method::GET, "/data.unknownext", &[]).await;
    assert_eq!(h[header::CONTENT_TYPE], "application/octet-stream");
    let (st, _, _) = call(&svc, Method::GET, "/.env", &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _, body) = call(&svc.clone().serve_hidden(true), Method::GET, "/.env", &[]).await;
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"SECRET"[..]));
    let (st, h, _) = call(&svc, Method::POST, "/style.css", &[]).await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h[header::ALLOW], "GET, HEAD");
    let (st, _, _) = call(&svc, Method::GET, "/missing", &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let no_redirect = ServeDir::new(dir.path()).redirect_directories(false);
    let (st, _, _) = call(&no_redirect, Method::GET, "/docs", &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn strip_prefix_serves_only_below_it() {
    let dir = TempDir::new("prefix");
    std::fs::create_dir_all(dir.path().join("docs")).unwrap();
    std::fs::write(dir.path().join("docs/index.html"), "docs").unwrap();
    std::fs::write(dir.path().join("index.html"), "root").unwrap();
    std::fs::write(dir.path().join("a.txt"), "a").unwrap();
    // However the prefix is written, it means the same.
    for prefix in ["/static", "/static/", "static", "//static//"] {
        let svc = ServeDir::new(dir.path()).strip_prefix(prefix);
        let cases: &[(&str, StatusCode, &str, Option<&str>)] = &[
            ("/static/a.txt", StatusCode::OK, "a", None),
            ("/static//a.txt", StatusCode::OK, "a", None),
            ("/static/", StatusCode::OK, "root", None),
            ("/static/.", StatusCode::OK, "root", None),
            ("/static/docs/", StatusCode::OK, "docs", None),
            (
                "/static",
                StatusCode::PERMANENT_REDIRECT,
                "",
                Some("static/"),
            ),
            (
                "/static?v=2",
                StatusCode::PERMANENT_REDIRECT,
                "",
                Some("static/?v=2"),
            ),
            (
                "/static/docs",
                StatusCode::PERMANENT_REDIRECT,
                "",
                Some("docs/"),
            ),
            ("/a.txt", StatusCode::NOT_FOUND, "", None),
            ("/staticx/a.txt", StatusCode::NOT_FOUND, "", None),
            ("/STATIC/a.txt", StatusCode::NOT_FOUND, "", None),
            ("/static/../a.txt", StatusCode::BAD_REQUEST, "", None),
            ("/static/%2e%2e/a.txt", StatusCode::BAD_REQUEST, "", None),
        ];
        for (path, want, body_want, location) in cases {
            let (st, h, body) = call(&svc, Method::GET, path, &[]).await;
            assert_eq!(
                (st, &body[..]),
                (*want, body_want.as_bytes()),
                "{prefix} {path}"
            );
            assert_eq!(
                h.get(header::LOCATION).map(|v| v.to_str().unwrap()),
                *location,
                "{prefix} {path}"
            );
        }
        // Outside the prefix the path is not ours, whatever the method; inside, the method
        // is checked.
        let (st, _, _) = call(&svc, Method::POST, "/other", &[]).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, h, _) = call(&svc, Method::POST, "/static/a.txt", &[]).await;
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(h[header::ALLOW], "GET, HEAD");
    }
    // An empty or "/" prefix strips nothing.
    for prefix in ["", "/"] {
        let svc = ServeDir::new(dir.path()).strip_prefix(prefix);
        let (st, _, body) = call(&svc, Method::GET, "/a.txt", &[]).await;
        assert_eq!((st, &body[..]), (StatusCode::OK, &b"a"[..]), "{prefix:?}");
    }
}

#[tokio::test]
async fn precompressed_siblings_follow_accept_encoding() {
    let dir = TempDir::new("precomp");
    std::fs::write(dir.path().join("app.js"), "plain").unwrap();
    std::fs::write(dir.path().join("app.js.br"), "brotli").unwrap();
    std::fs::write(dir.path().join("app.js.gz"), "gzip").unwrap();
    std::fs::write(dir.path().join("only.txt.zst"), "zstd").unwrap();
    std::fs::write(dir.path().join("only.txt"), "plain").unwrap();
    let svc = ServeDir::new(dir.path())
        .precompressed_br()
        .precompressed_gzip()
        .precompressed_zstd();
    let cases: &[(&str, &str, &str, Option<&str>)] = &[
        ("/app.js", "gzip, br", "brotli", Some("br")),
        ("/app.js", "gzip", "gzip", Some("gzip")),
        ("/app.js", "br;q=0.5, gzip;q=0.9", "gzip", Some("gzip")),
        ("/app.js", "br;q=0", "plain", None),
        ("/app.js", "identity", "plain", None),
        ("/app.js", "*", "brotli", Some("br")),
        ("/app.js", "zstd", "plain", None),
        ("/only.txt", "zstd, gzip", "zstd", Some("zstd")),
        ("/only.txt", "gzip", "plain", None),
    ];
    for (path, ae, want_body, want_enc) in cases {
        let (st, h, body) = call(
            &svc,
            Method::GET,
            path,
            &[("accept-encoding", ae.to_string())],
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            *want_body,
            "{path} {ae}"
        );
        assert_eq!(
            h.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap()),
            *want_enc,
            "{path} {ae}"
        );
        assert_eq!(h[header::VARY], "accept-encoding");
        let want_ct = if path.ends_with(".js") {
            "text/javascript"
        } else {
            "text/plain"
        };
        assert_eq!(h[header::CONTENT_TYPE], want_ct);
    }
    // Without precompression configured there is no Vary.
    let (_, h, _) = call(
        &ServeDir::new(dir.path()),
        Method::GET,
        "/app.js",
        &[("accept-encoding", "br".into())],
    )
    .await;
    assert!(h.get(header::VARY).is_none());
}

#[tokio::test]
async fn cache_notices_changes() {
    let dir = TempDir::new("cache");
    let path = dir.path().join("f.txt");
    std::fs::write(&path, "version one").unwrap();
    let svc = ServeDir::new(dir.path());
    let (_, h1, body) = call(&svc, Method::GET, "/f.txt", &[]).await;
    assert_eq!(&body[..], b"version one");
    // In-place change of size: noticed by the fstat on the cache hit.
    std::fs::write(&path, "version two!").unwrap();
    let (_, h2, body) = call(&svc, Method::GET, "/f.txt", &[]).await;
    assert_eq!(&body[..], b"version two!");
    assert_ne!(h1[header::ETAG], h2[header::ETAG]);
    // Replaced by rename (same size): noticed once the validity period is over.
    let svc = ServeDir::new(dir.path()).cache_validity(Duration::ZERO);
    let _ = call(&svc, Method::GET, "/f.txt", &[]).await;
    std::fs::write(dir.path().join("tmp"), "version 3 !!").unwrap();
    std::fs::rename(dir.path().join("tmp"), &path).unwrap();
    let (_, _, body) = call(&svc, Method::GET, "/f.txt", &[]).await;
    assert_eq!(&body[..], b"version 3 !!");
    // Deleted: a cached positive entry does not outlive the validity period.
    std::fs::remove_file(&path).unwrap();
    let (st, _, _) = call(&svc, Method::GET, "/f.txt", &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn clones_share_one_cache() {
    let dir = TempDir::new("shared");
    std::fs::write(dir.path().join("f.txt"), "one").unwrap();
    let a = ServeDir::new(dir.path()).cache_validity(Duration::from_secs(3600));
    let b = a.clone();
    let _ = call(&a, Method::GET, "/f.txt", &[]).await;
    // A same-size rename is invisible to `b` only if `b` uses `a`'s cache entry.
    std::fs::write(dir.path().join("tmp"), "two").unwrap();
    std::fs::rename(dir.path().join("tmp"), dir.path().join("f.txt")).unwrap();
    let (_, _, body) = call(&b, Method::GET, "/f.txt", &[]).await;
    assert_eq!(
        &body[..],
        b"one",
        "the clone served from the shared cache (old inode still open)"
    );
    b.clear_cache();
    let (_, _, body) = call(&a, Method::GET, "/f.txt", &[]).await;
    assert_eq!(&body[..], b"two");
}

#[tokio::test]
async fn serve_file_ignores_the_request_path() {
    let dir = TempDir::new("servefile");
    std::fs::write(dir.path().join("page.html"), "page").unwrap();
    let svc = ServeFile::new(dir.path().join("page.html"));
    for path in ["/", "/anything/else", "/page.html"] {
        let res = svc
            .clone()
            .oneshot(Request::get(path).body(()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "text/html");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"page");
    }
    let res = svc
        .oneshot(Request::get("/../x").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let missing = ServeFile::new(dir.path().join("nope.html"));
    let res = missing
        .oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn missing_root_is_500_then_recovers() {
    let dir = TempDir::new("lateroot");
    let root = dir.path().join("later");
    let svc = ServeDir::new(&root);
    let (st, _, _) = call(&svc, Method::GET, "/a", &[]).await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("a"), "ok").unwrap();
    let (st, _, _) = call(&svc, Method::GET, "/a", &[]).await;
    assert_eq!(st, StatusCode::OK);
}
