//! The browser harness itself, against a two-file site served by hand from the test: the page
//! renders (escaped text included), a script loaded from its own file handles a click, the
//! helpers read text, attributes, cookies and script results, and a screenshot is a PNG.

use std::time::Duration;

use anyhow::{Context, ensure};
use sagad_e2e::Scratch;
use sagad_e2e::browser::Browser;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The page: escaped markup in the heading, and a button that app.js wires up.
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>browser self-test</title>
<script src="/app.js" defer></script></head>
<body><h1 id="t">hello &lt;b&gt;</h1><button id="b" type="button">go</button></body></html>
"#;

/// The script, in a file of its own as the explorer's are: it marks the page ready once the
/// click handler is in place.
const APP: &str = r#"document.getElementById("b").addEventListener("click", () => {
  document.getElementById("t").textContent = "clicked <i>";
});
document.body.dataset.ready = "yes";
"#;

const WAIT: Duration = Duration::from_secs(10);

/// The PNG file signature.
const PNG: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

#[tokio::test]
async fn drives_a_page() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let site = format!("http://{}/", listener.local_addr()?);
    let server = tokio::spawn(serve(listener));
    let logs = Scratch::logs("browser")?;
    let browser = Browser::start(&logs).await?;

    browser
        .client()
        .goto(&site)
        .await
        .context("opening the page")?;
    browser.wait_for_text("#t", "hello <b>", WAIT).await?;
    ensure!(browser.text("#t").await? == "hello <b>");
    browser.wait_for("body[data-ready]", WAIT).await?;
    ensure!(browser.attr("body", "data-ready").await?.as_deref() == Some("yes"));
    ensure!(browser.attr("#b", "data-missing").await?.is_none());
    ensure!(browser.count("button").await? == 1);
    ensure!(browser.count("table").await? == 0);

    ensure!(browser.cookie_value("session").await?.as_deref() == Some("s3cret"));
    ensure!(browser.cookie_value("absent").await?.is_none());
    let title = browser.eval("return document.title;", vec![]).await?;
    ensure!(title == json!("browser self-test"), "title {title}");
    let status = browser
        .eval_async(
            "const done = arguments[arguments.length - 1];
             fetch(arguments[0]).then(r => done(r.status), e => done(String(e)));",
            vec![json!("/app.js")],
        )
        .await?;
    ensure!(status == json!(200), "fetching /app.js gave {status}");

    browser
        .wait_for("#b", WAIT)
        .await?
        .click()
        .await
        .context("clicking the button")?;
    browser.wait_for_text("#t", "clicked <i>", WAIT).await?;
    let timeout = browser
        .wait_for_text("#t", "never", Duration::from_millis(300))
        .await
        .err()
        .context("waiting for absent text succeeded")?;
    ensure!(
        timeout.to_string().contains("clicked <i>"),
        "the timeout does not say what was seen: {timeout}"
    );

    let path = browser.screenshot("browser-self-test").await?;
    let png = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(png.starts_with(&PNG), "{} is not a PNG", path.display());

    browser.close().await?;
    server.abort();
    Ok(())
}

/// Answers every connection with the page, the script or a 404.
async fn serve(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(answer(stream));
    }
}

/// One request, read up to its blank line, and its response; the connection then closes.
async fn answer(mut stream: TcpStream) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut buffer = [0; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let head = String::from_utf8_lossy(&head);
    let (status, kind, extra, body) = match head.split_whitespace().nth(1) {
        Some("/") => (
            "200 OK",
            "text/html; charset=utf-8",
            "Set-Cookie: session=s3cret; HttpOnly; Path=/\r\n",
            PAGE,
        ),
        Some("/app.js") => ("200 OK", "text/javascript", "", APP),
        _ => ("404 Not Found", "text/plain", "", "not found"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{extra}\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}
