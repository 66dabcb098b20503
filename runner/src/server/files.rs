//! Handlers of the files API: `/v1/files`, `/v1/files/{path}`, `/v1/archive`. In URL paths the
//! sandbox path is given without its leading slash: `/v1/files/workspace/notes.txt` names
//! `/workspace/notes.txt`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rustix::fs::OFlags;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use agentbox_proto::ErrorBody;

use super::query;
use crate::error::{Error, Result};
use crate::files::{self, Format, Listing, Written};
use crate::jail::{Jail, WORKSPACE_ALIAS};
use crate::AppState;

#[derive(Debug, Deserialize)]
struct PathQuery {
    path: Option<String>,
}

/// List a directory
///
/// `GET /v1/files?path=/workspace` (or `/v1/files/?path=`): the entries, sorted by name.
#[utoipa::path(get, path = "/v1/files", tag = "files",
    params(("path" = Option<String>, Query, description = "A sandbox path, default `/workspace`.")),
    responses((status = 200, description = "The entries.", body = Listing),
        (status = 400, description = "`invalid_path` (outside the workspace), `not_a_directory`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody), (status = 404, description = "`file_not_found`.", body = ErrorBody)))]
pub(super) async fn list_files(
    State(app): State<Arc<AppState>>,
    uri: Uri,
) -> Result<Json<Listing>> {
    let q: PathQuery = query(&uri)?;
    let dir = app.jail.open(
        q.path.as_deref().unwrap_or(WORKSPACE_ALIAS),
        OFlags::RDONLY | OFlags::DIRECTORY,
    )?;
    let listing = tokio::task::spawn_blocking(move || files::list(&app.jail, &dir.fd, &dir.rel))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    Ok(Json(listing))
}

/// Download a file, optionally a byte range
#[utoipa::path(get, path = "/v1/files/{path}", tag = "files",
    params(("path" = String, Path, description = "The sandbox path without its leading slash: `workspace/notes.txt` is `/workspace/notes.txt`."), ("Range" = Option<String>, Header, description = "One byte range, e.g. `bytes=0-1023`.")),
    responses(
        (status = 200, description = "The file's bytes.", content_type = "application/octet-stream", body = String),
        (status = 206, description = "The requested range.", content_type = "application/octet-stream", body = String),
        (status = 400, description = "`invalid_path`, `is_a_directory`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody), (status = 404, description = "`file_not_found`.", body = ErrorBody),
        (status = 416, description = "`range_not_satisfiable`.", body = ErrorBody)))]
pub(super) async fn read_file(
    State(app): State<Arc<AppState>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer; the type is checked on what was
    // opened, so nothing can be swapped in between.
    let found = app
        .jail
        .open(&format!("/{path}"), OFlags::RDONLY | OFlags::NONBLOCK)?;
    let shown = Jail::shown(&found.rel);
    let file = std::fs::File::from(found.fd);
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(Error::IsADirectory(shown));
    }
    if !meta.is_file() {
        return Err(Error::InvalidPath(format!("{shown} is not a regular file")));
    }
    let mut file = tokio::fs::File::from_std(file);
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

/// Upload a file
///
/// The body is the file's content, streamed to a temporary file and renamed into place.
#[utoipa::path(put, path = "/v1/files/{path}", tag = "files",
    params(("path" = String, Path, description = "The sandbox path without its leading slash: `workspace/notes.txt` is `/workspace/notes.txt`.")),
    request_body(content = String, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Written.", body = Written),
        (status = 400, description = "`invalid_path`, `is_a_directory`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody), (status = 413, description = "`payload_too_large`: over `maxUploadBytes`.", body = ErrorBody)))]
pub(super) async fn write_file(
    State(app): State<Arc<AppState>>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let user = format!("/{path}");
    if app.jail.relative(&user)?.as_os_str().is_empty() {
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
    let target = app.jail.parent(&user, true)?;
    let written = files::write_stream(target, stream, limit).await?;
    Ok((StatusCode::CREATED, Json(written)).into_response())
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    recursive: Option<bool>,
}

/// Delete a file or directory
#[utoipa::path(delete, path = "/v1/files/{path}", tag = "files",
    params(("path" = String, Path, description = "The sandbox path without its leading slash: `workspace/notes.txt` is `/workspace/notes.txt`."), ("recursive" = Option<bool>, Query, description = "Delete a directory with its content.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, description = "`invalid_path` (outside the workspace, or the workspace itself), `invalid_request`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody), (status = 404, description = "`file_not_found`.", body = ErrorBody),
        (status = 409, description = "`directory_not_empty`: pass `?recursive=true`.", body = ErrorBody)))]
pub(super) async fn delete_file(
    State(app): State<Arc<AppState>>,
    Path(path): Path<String>,
    uri: Uri,
) -> Result<StatusCode> {
    let q: DeleteQuery = query(&uri)?;
    let target = app.jail.parent(&format!("/{path}"), false)?;
    tokio::task::spawn_blocking(move || files::delete(&target, q.recursive.unwrap_or(false)))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct ArchiveQuery {
    path: Option<String>,
    format: Option<Format>,
}

/// Download a directory as a zip (or tar)
#[utoipa::path(get, path = "/v1/archive", tag = "files",
    params(("path" = Option<String>, Query, description = "A sandbox directory, default `/workspace`."),
        ("format" = Option<Format>, Query, description = "`zip` (default) or `tar`.")),
    responses(
        (status = 200, description = "The archive, streamed as it is built.",
            content((String = "application/zip"), (String = "application/x-tar"))),
        (status = 400, description = "`invalid_path`, `not_a_directory`, `invalid_request`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: missing or wrong bearer token.", body = ErrorBody), (status = 404, description = "`file_not_found`.", body = ErrorBody)))]
pub(super) async fn archive(State(app): State<Arc<AppState>>, uri: Uri) -> Result<Response> {
    let q: ArchiveQuery = query(&uri)?;
    let dir = app.jail.open(
        q.path.as_deref().unwrap_or(WORKSPACE_ALIAS),
        OFlags::RDONLY | OFlags::DIRECTORY,
    )?;
    let format = q.format.unwrap_or_default();
    let name = match dir.rel.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        None => "workspace".to_owned(),
    };
    let rx = files::archive(dir.fd, app.jail.reserved_ids(), format);
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
