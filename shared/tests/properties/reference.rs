//! Reference implementations, written independently of the product's code:
//! decode, normalise, then decide.

/// Percent-decodes once, as a server does; malformed escapes stay.
pub(super) fn decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if let (Some(h), Some(l)) = (
                s.get(i + 1).copied().and_then(hex),
                s.get(i + 2).copied().and_then(hex),
            ) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// The path a server ends up serving: decoded once, backslashes read as
/// slashes, dot segments resolved.
pub(super) fn normalised_path(path: &str) -> Vec<Vec<u8>> {
    let decoded: Vec<u8> = decode(path.as_bytes())
        .into_iter()
        .map(|b| if b == b'\\' { b'/' } else { b })
        .collect();
    let mut out: Vec<Vec<u8>> = Vec::new();
    for seg in decoded.split(|b| *b == b'/').skip(1) {
        match seg {
            b"." => {}
            b".." => {
                out.pop();
            }
            s => out.push(s.to_vec()),
        }
    }
    out
}

/// Whether a request may reach GitLab: a method GitLab serves, origin form,
/// and a path that, once decoded and normalised, is in the REST API or git
/// smart HTTP (or the `.git`-less handshake GitLab redirects).
pub(super) fn reference_allows(method: &str, target: &str) -> bool {
    let methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
    if !methods.contains(&method) {
        return false;
    }
    if !target.starts_with('/') || target.starts_with("//") {
        return false;
    }
    let path = target.split('?').next().unwrap_or("");
    let segs = normalised_path(path);
    let s: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
    let api = s.len() >= 2 && s[0] == b"api" && s[1] == b"v4";
    let graphql = s == [b"api".as_slice(), b"graphql".as_slice()];
    let git = s.iter().enumerate().any(|(i, seg)| {
        let repo = seg.len() > ".git".len() && seg.ends_with(b".git");
        let smart_http = matches!(
            &s[i + 1..],
            [b"info", b"refs"] | [b"git-upload-pack"] | [b"git-receive-pack"]
        );
        let lfs = s.len() > i + 3 && s[i + 1] == b"info" && s[i + 2] == b"lfs";
        repo && (smart_http || lfs)
    });
    // The `.git`-less clone handshake, which GitLab answers with a redirect
    // to the `.git` path: GET/HEAD of /<namespace>/<project>/info/refs, no
    // query or exactly one git service.
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let n = s.len();
    let gitless = (method == "GET" || method == "HEAD")
        && n >= 4
        && s[n - 2] == b"info"
        && s[n - 1] == b"refs"
        && s[..n - 2].iter().all(|seg| !seg.is_empty())
        && matches!(
            query,
            "" | "service=git-upload-pack" | "service=git-receive-pack"
        );
    api || graphql || git || gitless
}

pub(super) const AUTH_PARAMS: [&str; 7] = [
    "private_token",
    "access_token",
    "bearer_token",
    "job_token",
    "token",
    "feed_token",
    "rss_token",
];

/// Rack's reading of one query piece's name: `+` is a space, `%XX` a byte,
/// spaces after the separator skipped; the base names Rack 2 and Rack 3 give
/// a nested name.
pub(super) fn rack_base_names(piece: &str) -> Vec<Vec<u8>> {
    let name = piece.split('=').next().unwrap_or("");
    let name: Vec<u8> = decode(name.replace('+', " ").as_bytes());
    let name: Vec<u8> = name.into_iter().skip_while(|b| *b == b' ').collect();
    let rack2: Vec<u8> = name
        .iter()
        .copied()
        .skip_while(|b| *b == b'[' || *b == b']')
        .take_while(|b| *b != b'[' && *b != b']')
        .collect();
    let rack3: Vec<u8> = match name.iter().skip(1).position(|b| *b == b'[') {
        Some(i) => name[..=i].to_vec(),
        None => name.clone(),
    };
    vec![rack2, rack3]
}

pub(super) fn reference_is_credential(piece: &str, with_sudo: bool) -> bool {
    rack_base_names(piece).iter().any(|n| {
        AUTH_PARAMS.iter().any(|a| a.as_bytes() == n.as_slice())
            || (with_sudo && n.as_slice() == b"sudo")
    })
}

pub(super) fn split_pieces(q: &str) -> Vec<&str> {
    q.split(['&', ';']).collect()
}
