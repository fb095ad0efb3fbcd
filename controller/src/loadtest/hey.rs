//! `hey` command lines, as flagger-loadtester's users write them in `metadata.cmd`
//! (`hey -z 1m -q 10 -c 2 http://podinfo-canary.test:9898/`), parsed and run natively: no shell,
//! no `hey` binary. The flags that shape the load are honoured (`-z`, `-n`, `-q`, `-c`, `-m`,
//! `-H`, `-d`, `-t`); any other flag or command is refused with the reason.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::http::HttpClient;

/// A parsed `hey` command.
#[derive(Debug, Clone, PartialEq)]
pub struct Hey {
    /// The URL.
    pub url: String,
    /// `-z`: run for this long (then `-n` is ignored, as in hey).
    pub duration: Option<Duration>,
    /// `-n`: requests in all (hey's default 200).
    pub requests: u64,
    /// `-c`: workers (hey's default 50).
    pub concurrency: u64,
    /// `-q`: requests per second per worker (0: as fast as possible).
    pub rate_per_worker: f64,
    /// `-m`: the method (default GET).
    pub method: String,
    /// `-H`: headers.
    pub headers: Vec<(String, String)>,
    /// `-d`: the body.
    pub body: Option<String>,
    /// `-t`: per-request timeout (hey's default 20s).
    pub timeout: Duration,
}

/// Splits a command line as a POSIX shell would split words (quotes, backslashes), without
/// expanding anything.
pub fn split(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("an unclosed ' quote".to_owned()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => word.push(c),
                            None => return Err("a trailing backslash".to_owned()),
                        },
                        Some(c) => word.push(c),
                        None => return Err("an unclosed \" quote".to_owned()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err("a trailing backslash".to_owned()),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            ';' | '|' | '&' | '>' | '<' | '`' | '$' => {
                return Err(format!(
                    "`{c}` is shell syntax; the load tester runs no shell, only one hey command"
                ))
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// The most workers one load may ask for (`-c`): each is a task holding a connection.
pub const MAX_CONCURRENCY: u64 = 1_000;

impl Hey {
    /// Parses `cmd`; `Err` says what is not supported and what is.
    pub fn parse(cmd: &str) -> Result<Hey, String> {
        let words = split(cmd)?;
        let Some((program, args)) = words.split_first() else {
            return Err("metadata.cmd is empty: write a hey command, e.g. `hey -z 1m -q 10 -c 2 http://app-canary.test/`".to_owned());
        };
        if program != "hey" && !program.ends_with("/hey") {
            return Err(format!(
                "`{program}` is not supported: weir loadtest runs hey commands only (natively, never through a shell), e.g. `hey -z 1m -q 10 -c 2 http://app-canary.test/`"
            ));
        }
        let mut hey = Hey {
            url: String::new(),
            duration: None,
            requests: 200,
            concurrency: 50,
            rate_per_worker: 0.0,
            method: "GET".to_owned(),
            headers: Vec::new(),
            body: None,
            timeout: Duration::from_secs(20),
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| {
                args.next()
                    .cloned()
                    .ok_or_else(|| format!("hey {flag} needs a value"))
            };
            let number = |flag: &str, text: String| {
                text.parse::<u64>()
                    .map_err(|_| format!("hey {flag} {text}: not a whole number"))
            };
            match arg.as_str() {
                "-z" => {
                    let text = value("-z")?;
                    hey.duration = Some(
                        crate::spec::parse_go_duration(&text)
                            .map_err(|e| format!("hey -z {text}: {e}"))?,
                    );
                }
                "-n" => hey.requests = number("-n", value("-n")?)?,
                "-c" => {
                    hey.concurrency = number("-c", value("-c")?)?.max(1);
                    if hey.concurrency > MAX_CONCURRENCY {
                        return Err(format!(
                            "hey -c {}: at most {MAX_CONCURRENCY} workers per load",
                            hey.concurrency
                        ));
                    }
                }
                "-q" => {
                    let text = value("-q")?;
                    hey.rate_per_worker = text
                        .parse::<f64>()
                        .ok()
                        .filter(|q| q.is_finite() && *q >= 0.0)
                        .ok_or_else(|| format!("hey -q {text}: not a rate"))?;
                }
                "-t" => hey.timeout = Duration::from_secs(number("-t", value("-t")?)?.max(1)),
                "-m" => hey.method = value("-m")?.to_uppercase(),
                "-d" => hey.body = Some(value("-d")?),
                "-H" => {
                    let text = value("-H")?;
                    let (name, v) = text
                        .split_once(':')
                        .ok_or_else(|| format!("hey -H {text}: write it as 'Name: value'"))?;
                    hey.headers.push((name.trim().to_owned(), v.trim().to_owned()));
                }
                "-T" => hey.headers.push(("Content-Type".to_owned(), value("-T")?)),
                "-disable-keepalive" | "-disable-compression" | "-h2" | "-disable-redirects" => {}
                flag if flag.starts_with('-') => {
                    return Err(format!(
                        "hey flag {flag} is not supported; weir loadtest knows -z, -n, -c, -q, -t, -m, -H, -T, -d"
                    ))
                }
                url if hey.url.is_empty() => hey.url = url.to_owned(),
                extra => return Err(format!("hey takes one URL; `{extra}` is a second one")),
            }
        }
        if !(hey.url.starts_with("http://") || hey.url.starts_with("https://")) {
            return Err(format!(
                "hey needs an http(s) URL as its last argument, got `{}`",
                hey.url
            ));
        }
        Ok(hey)
    }

    /// Sends the load; returns how many requests got an answer (any status, as hey counts them)
    /// and how many got none (refused, timed out).
    pub async fn run(&self, http: &HttpClient) -> (u64, u64) {
        let answered = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let end = self.duration.map(|d| started + d);
        // Without -z, -n is shared among the workers (hey: n / c each).
        let per_worker = self.requests / self.concurrency;
        let mut workers = Vec::new();
        for _ in 0..self.concurrency {
            let hey = self.clone();
            let http = http.clone();
            let (answered, failed) = (answered.clone(), failed.clone());
            workers.push(tokio::spawn(async move {
                let interval = (hey.rate_per_worker > 0.0)
                    .then(|| Duration::from_secs_f64(1.0 / hey.rate_per_worker));
                let mut sent = 0u64;
                let mut next = Instant::now();
                loop {
                    match end {
                        Some(end) if Instant::now() >= end => break,
                        None if sent >= per_worker => break,
                        _ => {}
                    }
                    if let Some(interval) = interval {
                        let wait = next.saturating_duration_since(Instant::now());
                        if let Some(end) = end {
                            if Instant::now() + wait >= end {
                                break;
                            }
                        }
                        tokio::time::sleep(wait).await;
                        next += interval;
                    }
                    sent += 1;
                    let method = reqwest::Method::from_bytes(hey.method.as_bytes())
                        .unwrap_or(reqwest::Method::GET);
                    let mut request = http.client(false).request(method, &hey.url);
                    for (name, value) in &hey.headers {
                        request = request.header(name.as_str(), value.as_str());
                    }
                    if let Some(body) = &hey.body {
                        request = request.body(body.clone());
                    }
                    match http.send_discarding(request, hey.timeout).await {
                        Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        for worker in workers {
            let _ = worker.await;
        }
        (
            answered.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flaggers_tutorial_command_parses_with_hey_defaults_for_the_rest() {
        let hey = Hey::parse("hey -z 1m -q 10 -c 2 -H 'X-Canary: insider' -m POST -d '{\"a\": 1}' http://podinfo-canary.test:9898/").unwrap();
        assert_eq!(hey.duration, Some(Duration::from_secs(60)));
        assert_eq!((hey.concurrency, hey.rate_per_worker), (2, 10.0));
        assert_eq!(
            hey.headers,
            vec![("X-Canary".to_owned(), "insider".to_owned())]
        );
        assert_eq!(
            (hey.method.as_str(), hey.body.as_deref()),
            ("POST", Some("{\"a\": 1}"))
        );
        assert_eq!(hey.url, "http://podinfo-canary.test:9898/");
        assert_eq!(Hey::parse("hey http://a/").unwrap().requests, 200);
    }

    #[test]
    fn other_commands_and_shell_syntax_are_refused_saying_why() {
        let curl = Hey::parse("curl -s http://a/").unwrap_err();
        assert!(
            curl.contains("`curl` is not supported") && curl.contains("hey"),
            "{curl}"
        );
        let chained = Hey::parse("hey http://a/ && rm -rf /").unwrap_err();
        assert!(chained.contains("shell syntax"), "{chained}");
        assert!(Hey::parse("hey -x 1 http://a/")
            .unwrap_err()
            .contains("-x is not supported"));
        assert!(Hey::parse("hey -z 1m").unwrap_err().contains("URL"));
    }
}
