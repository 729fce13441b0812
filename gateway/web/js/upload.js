// Uploading one file: hash in a Worker, create (or resume, or complete instantly with a
// proof), PUT the chunks in parallel with progress, then complete.
//
// Resume: the upload id is remembered in localStorage under the file's identity (name,
// size, last-modified). Picking the same file again, after a reload or a lost connection,
// asks the server which chunks are missing and sends only those.

import { ApiError, describeError } from "./api.js";
import { sha256, toHex } from "./sha256.js";

const PENDING_KEY = "vod.pendingUploads";
const PARALLEL_CHUNKS = 3;
const RETRY_DELAYS_MS = [500, 1000, 2000, 4000, 8000];

function fileIdentity(file) {
  return [file.name, file.size, file.lastModified].join("|");
}

function readPending() {
  try {
    return JSON.parse(localStorage.getItem(PENDING_KEY) || "{}");
  } catch {
    return {};
  }
}

function writePending(pending) {
  localStorage.setItem(PENDING_KEY, JSON.stringify(pending));
}

export function rememberUpload(file, uploadId, contentHash) {
  const pending = readPending();
  pending[fileIdentity(file)] = { upload_id: uploadId, content_hash: contentHash, saved_at: Date.now() };
  writePending(pending);
}

export function forgetUpload(file) {
  const pending = readPending();
  delete pending[fileIdentity(file)];
  writePending(pending);
}

export function pendingUpload(file) {
  return readPending()[fileIdentity(file)] || null;
}

export function hashInWorker(file, onProgress) {
  return new Promise((resolve, reject) => {
    const worker = new Worker(new URL("./hash-worker.js", import.meta.url), { type: "module" });
    worker.onmessage = (event) => {
      const message = event.data;
      if (message.type === "progress") onProgress(message.hashed);
      else {
        worker.terminate();
        if (message.type === "done") resolve(message.contentHash);
        else reject(new Error("Could not read the file: " + message.message));
      }
    };
    worker.onerror = (event) => {
      worker.terminate();
      reject(new Error("Could not hash the file: " + (event.message || "worker failed")));
    };
    worker.postMessage({ file });
  });
}

function waitOnline() {
  if (navigator.onLine) return Promise.resolve();
  return new Promise((resolve) => window.addEventListener("online", resolve, { once: true }));
}

// Events on the returned uploader: "status" {text}, "progress" {sent, total, speed, eta}.
export class Upload extends EventTarget {
  constructor(session, file) {
    super();
    this.session = session;
    this.file = file;
    this.sentByChunk = new Map();
    this.doneBytes = 0;
    this.startedAt = 0;
    this.startBytes = 0;
    this.resumed = false;
    this.instant = false;
    this.xhrs = new Set();
    this.cancelled = false;
  }

  status(text) {
    this.dispatchEvent(new CustomEvent("status", { detail: { text } }));
  }

  // Runs the whole upload; resolves to the completed upload id.
  async run() {
    const remembered = pendingUpload(this.file);
    if (remembered) {
      const resumed = await this.resume(remembered);
      if (resumed) return resumed;
    }
    this.status("Reading the file…");
    const contentHash = await hashInWorker(this.file, (hashed) => {
      this.status(`Reading the file… ${Math.floor((hashed / Math.max(1, this.file.size)) * 100)}%`);
    });
    const created = await this.session.fetch("POST", "/uploads", {
      body: { filename: this.file.name, size: this.file.size, content_hash: contentHash },
    });
    if (created.instant) {
      this.instant = true;
      this.status("This file is already on the server: proving we have it…");
      const { offset, length } = created.challenge;
      const range = await this.file.slice(offset, offset + length).arrayBuffer();
      const proof = toHex(await sha256(range));
      await this.session.fetch("POST", `/uploads/${created.upload_id}/complete`, { body: { proof } });
      this.doneBytes = this.file.size;
      this.progress();
      this.status("Uploaded instantly: the server already had this file.");
      return created.upload_id;
    }
    rememberUpload(this.file, created.upload_id, contentHash);
    this.status(`Uploading ${created.total_chunks} chunk${created.total_chunks === 1 ? "" : "s"}…`);
    const indices = Array.from({ length: created.total_chunks }, (_, i) => i);
    return this.sendChunks(created.upload_id, created.chunk_size, indices);
  }

  async resume(remembered) {
    let state;
    try {
      state = await this.session.fetch("GET", `/uploads/${remembered.upload_id}`);
    } catch (error) {
      if (error instanceof ApiError && (error.status === 404 || error.status === 403)) {
        forgetUpload(this.file); // expired or someone else's: start over
        return null;
      }
      throw error;
    }
    if (state.state === "expired") {
      forgetUpload(this.file); // finished, but its file was removed unused: start over
      return null;
    }
    this.resumed = true;
    if (state.state === "complete") {
      this.doneBytes = this.file.size;
      this.progress();
      return state.upload_id;
    }
    const have = state.total_chunks - state.missing.length;
    this.status(`Resuming: ${have} of ${state.total_chunks} chunks already on the server.`);
    for (const index of state.received) {
      this.doneBytes += Math.min(state.chunk_size, this.file.size - index * state.chunk_size);
    }
    return this.sendChunks(state.upload_id, state.chunk_size, state.missing);
  }

  async sendChunks(uploadId, chunkSize, indices) {
    this.startedAt = performance.now();
    this.startBytes = this.doneBytes;
    this.progress();
    const queue = [...indices];
    const lane = async () => {
      while (queue.length && !this.cancelled) {
        const index = queue.shift();
        await this.sendWithRetry(uploadId, chunkSize, index);
      }
    };
    await Promise.all(Array.from({ length: Math.min(PARALLEL_CHUNKS, indices.length) }, lane));
    if (this.cancelled) throw new Error("Upload cancelled.");
    this.status("Finishing…");
    await this.session.fetch("POST", `/uploads/${uploadId}/complete`, { body: {} });
    forgetUpload(this.file);
    this.status(this.resumed ? "Upload resumed and finished." : "Upload finished.");
    return uploadId;
  }

  async sendWithRetry(uploadId, chunkSize, index) {
    const start = index * chunkSize;
    const blob = this.file.slice(start, Math.min(start + chunkSize, this.file.size));
    const checksum = toHex(await sha256(await blob.arrayBuffer()));
    for (let attempt = 0; ; attempt++) {
      try {
        await this.put(uploadId, index, blob, checksum);
        this.sentByChunk.delete(index);
        this.doneBytes += blob.size;
        this.progress();
        return;
      } catch (error) {
        this.sentByChunk.delete(index);
        const retryable = error.status === 0 || error.status >= 500 || error.status === 429;
        if (!retryable || attempt >= RETRY_DELAYS_MS.length || this.cancelled) throw error;
        if (error.status !== 0) this.status("The server is busy: retrying…");
        else if (!navigator.onLine) this.status("You are offline: the upload will continue when the connection is back.");
        else this.status("Connection lost: the upload will continue when it is back.");
        await waitOnline();
        await new Promise((resolve) => setTimeout(resolve, RETRY_DELAYS_MS[attempt]));
      }
    }
  }

  async put(uploadId, index, blob, checksum) {
    const token = await this.session.token();
    await new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      this.xhrs.add(xhr);
      xhr.open("PUT", `/api/v1/uploads/${uploadId}/chunks/${index}`);
      xhr.setRequestHeader("Authorization", "Bearer " + token);
      xhr.setRequestHeader("X-Chunk-SHA256", checksum);
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.upload.onprogress = (event) => {
        this.sentByChunk.set(index, event.loaded);
        this.progress();
      };
      xhr.onload = () => {
        this.xhrs.delete(xhr);
        if (xhr.status >= 200 && xhr.status < 300) return resolve();
        let problem = null;
        try {
          problem = JSON.parse(xhr.responseText);
        } catch {}
        return reject(new ApiError(xhr.status, problem, (problem && problem.detail) || xhr.statusText));
      };
      xhr.onerror = xhr.onabort = () => {
        this.xhrs.delete(xhr);
        reject(new ApiError(0, null, "Network error"));
      };
      xhr.send(blob);
    });
  }

  cancel() {
    this.cancelled = true;
    for (const xhr of this.xhrs) xhr.abort();
  }

  progress() {
    let inFlight = 0;
    for (const loaded of this.sentByChunk.values()) inFlight += loaded;
    const sent = Math.min(this.file.size, this.doneBytes + inFlight);
    const seconds = (performance.now() - this.startedAt) / 1000;
    const speed = seconds > 0.2 ? (sent - this.startBytes) / seconds : 0;
    const eta = speed > 0 ? (this.file.size - sent) / speed : null;
    this.dispatchEvent(new CustomEvent("progress", { detail: { sent, total: this.file.size, speed, eta } }));
  }
}

export { describeError };
