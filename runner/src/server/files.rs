//! Handlers of the files API: `/v1/files`, `/v1/files/{path}`, `/v1/archive`. In URL paths the
//! sandbox path is given without its leading slash: `/v1/files/workspace/notes.txt` names
//! `/workspace/notes.txt`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::query;
use crate::error::{Error, Result};
use crate::files::{self, Format, Listing};
use crate::jail::WORKSPACE_ALIAS;
use crate::AppState;

#[derive(Debug, Deserialize)]
struct PathQuery {
    path: Option<String>,
}

pub(super) async fn list_files(
    State(app): State<Arc<AppState>>,
    uri: Uri,
) -> Result<Json<Listing>> {
    let q: PathQuery = query(&uri)?;
    let dir = app
        .jail
        .resolve(q.path.as_deref().unwrap_or(WORKSPACE_ALIAS))?;
    let root = app.jail.root().to_path_buf();
    let hidden = app.cfg.state_dir.clone();
    let listing = tokio::task::spawn_blocking(move || files::list(&root, &dir, &hidden))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    Ok(Json(listing))
}

pub(super) async fn read_file(
    State(app): State<Arc<AppState>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    let real = app.jail.resolve_file(&format!("/{path}"))?;
    let shown = files::sandbox_path(app.jail.root(), &real);
    // Check the type before opening: opening a FIFO would block until someone writes to it.
    match tokio::fs::metadata(&real).await {
        Ok(m) if m.is_dir() => return Err(Error::IsADirectory(shown)),
        Ok(m) if !m.is_file() => {
            return Err(Error::InvalidPath(format!("{shown} is not a regular file")))
        }
        _ => {}
    }
    let mut file = tokio::fs::File::open(&real).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::FileNotFound(shown.clone())
        } else {
            Error::from(e)
        }
    })?;
    let meta = file.metadata().await?;
    if meta.is_dir() {
        return Err(Error::IsADirectory(shown));
    }
    let len = meta.len();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, count) = match files::parse_range(range, len) {
        Err(()) => return Err(Error::RangeNotSatisfiable(len)),
        Ok(None) => (StatusCode::OK, 0, len),
        Ok(Some(r)) => (StatusCode::PARTIAL_CONTENT, r.start, r.end - r.start),
    };
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start)).await?;
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(count), 256 << 10);
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if status == StatusCode::PARTIAL_CONTENT {
        let value = format!("bytes {}-{}/{len}", start, start + count - 1);
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(response)
}

pub(super) async fn write_file(
    State(app): State<Arc<AppState>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let target = app.jail.resolve_entry(&format!("/{path}"))?;
    if target == app.jail.root() {
        return Err(Error::IsADirectory(WORKSPACE_ALIAS.into()));
    }
    let limit = app.cfg.max_upload_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    if declared.is_some_and(|n| n > limit) {
        files::drain(&mut stream).await;
        return Err(Error::PayloadTooLarge(format!(
            "uploads are limited to {limit} bytes"
        )));
    }
    let written = files::write_stream(app.jail.root(), &target, stream, limit).await?;
    Ok((StatusCode::CREATED, Json(written)).into_response())
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    recursive: Option<bool>,
}

pub(super) async fn delete_file(
    State(app): State<Arc<AppState>>,
    Path(path): Path<String>,
    uri: Uri,
) -> Result<StatusCode> {
    let q: DeleteQuery = query(&uri)?;
    let target = app.jail.resolve_entry(&format!("/{path}"))?;
    let root = app.jail.root().to_path_buf();
    tokio::task::spawn_blocking(move || {
        files::delete(&root, &target, q.recursive.unwrap_or(false))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct ArchiveQuery {
    path: Option<String>,
    format: Option<Format>,
}

pub(super) async fn archive(State(app): State<Arc<AppState>>, uri: Uri) -> Result<Response> {
    let q: ArchiveQuery = query(&uri)?;
    let dir = app
        .jail
        .resolve(q.path.as_deref().unwrap_or(WORKSPACE_ALIAS))?;
    let shown = files::sandbox_path(app.jail.root(), &dir);
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Error::NotADirectory(shown)),
        Err(_) => return Err(Error::FileNotFound(shown)),
    }
    let format = q.format.unwrap_or_default();
    let name = match dir.file_name() {
        Some(n) if dir != app.jail.root() => n.to_string_lossy().into_owned(),
        _ => "workspace".to_owned(),
    };
    let rx = files::archive(dir, app.cfg.state_dir.clone(), format);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let (mime, ext) = match format {
        Format::Zip => ("application/zip", "zip"),
        Format::Tar => ("application/x-tar", "tar"),
    };
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    let disposition = format!("attachment; filename=\"{}.{ext}\"", name.replace('"', ""));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}
