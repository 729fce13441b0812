// The API client: the signed-in session, silent token refresh, problem documents in words.
//
// The refresh token never reaches this script: signed in with "cookie": true, the server
// keeps it in an HttpOnly cookie (beside the device id its sign-in is bound to) that only
// /api/v1/sessions sees, and a refresh is a POST with no body. What is stored here is the
// access token, its expiry and the user.
//
// Refresh tokens are single use and rotating: presenting a spent one revokes the whole
// family (everyone signed out). So at most one refresh is in flight, in this tab (one
// shared promise) and across tabs (a Web Lock; after taking it, a tab first looks whether
// another tab already refreshed and stored a newer access token).

import { formatBytes } from "./dom.js";

export const API = "/api/v1";
const STORAGE_KEY = "vod.session";
// Refresh this long before the access token expires (15 min lifetime).
const REFRESH_MARGIN_MS = 60 * 1000;

export class ApiError extends Error {
  constructor(status, problem, message) {
    super(message);
    this.status = status;
    this.code = (problem && problem.code) || (status === 0 ? "offline" : "http_" + status);
    this.problem = problem || {};
  }
}

function readStored() {
  let state;
  try {
    state = JSON.parse(localStorage.getItem(STORAGE_KEY) || "null");
  } catch {
    return null;
  }
  if (state && state.refresh_token) {
    // Stored by an earlier version of this page, where scripts could read the refresh
    // token: not kept, that session has to sign in again.
    localStorage.removeItem(STORAGE_KEY);
    return null;
  }
  return state;
}

// Words for a failed request: the server's detail when it sent one, else our own.
export function describeError(error) {
  if (!(error instanceof ApiError)) return String((error && error.message) || error);
  if (error.status === 0) return "You appear to be offline: check your connection and try again.";
  const problem = error.problem;
  if (error.code === "upload_too_large" && Number.isFinite(problem.max_bytes)) {
    return `This file is too big: the largest upload allowed is ${formatBytes(problem.max_bytes)}.`;
  }
  if (error.code === "quota_exceeded" && Number.isFinite(problem.quota_bytes)) {
    return (
      `Not enough room in your storage: this file needs ${formatBytes(problem.size)}, ` +
      `and ${formatBytes(problem.remaining_bytes)} of your ${formatBytes(problem.quota_bytes)} are free. ` +
      "Delete videos or unfinished uploads to make room."
    );
  }
  if (error.status === 413) {
    return problem.detail || "That file is too big, or over your storage quota.";
  }
  if (error.status === 429) return error.problem.detail || "Too many requests: wait a moment and try again.";
  if (error.status >= 500) return "The server had a problem. Please try again in a moment.";
  return error.problem.detail || error.problem.title || error.message;
}

async function parseBody(response) {
  const type = response.headers.get("Content-Type") || "";
  if (response.status === 204) return null;
  if (type.includes("json")) return response.json();
  return response.text();
}

export class Session extends EventTarget {
  constructor() {
    super();
    this.state = readStored(); // {access_token, expires_at, user}
    this.refreshing = null;
    this.timer = null;
    // Another tab signed in, refreshed or signed out: follow it.
    window.addEventListener("storage", (event) => {
      if (event.key !== STORAGE_KEY) return;
      this.state = readStored();
      this.schedule();
      this.dispatchEvent(new Event("change"));
    });
    this.schedule();
  }

  get user() {
    return this.state && this.state.user;
  }

  get signedIn() {
    return Boolean(this.state && this.state.access_token);
  }

  get accessToken() {
    return this.state ? this.state.access_token : null;
  }

  store(state) {
    this.state = state;
    if (state) localStorage.setItem(STORAGE_KEY, JSON.stringify(state));
    else localStorage.removeItem(STORAGE_KEY);
    this.schedule();
    this.dispatchEvent(new Event("change"));
  }

  schedule() {
    clearTimeout(this.timer);
    if (!this.state) return;
    const due = Math.max(0, this.state.expires_at - REFRESH_MARGIN_MS - Date.now());
    this.timer = setTimeout(() => this.refresh().catch(() => {}), due);
  }

  async signIn(username, password) {
    const tokens = await request("POST", "/sessions", { body: { username, password, cookie: true } });
    this.store(pairToState(tokens, null));
    const user = await this.fetch("GET", "/users/me");
    this.store({ ...this.state, user });
    return user;
  }

  async signOut() {
    const state = this.state;
    this.store(null);
    if (!state) return;
    // The server revokes the access token and its refresh family and clears the refresh
    // cookie. An access token past its time is exchanged first, so the cookie is cleared
    // even then. Signed out locally whatever it answers.
    let token = state.access_token;
    if (Date.now() > state.expires_at - 5000) {
      const tokens = await request("POST", "/sessions/refresh").catch(() => null);
      token = tokens && tokens.access_token;
    }
    if (token) await request("DELETE", "/sessions", { token }).catch(() => {});
  }

  // Ends the session locally, telling the page why (it shows the sign-in form).
  expire(reason) {
    this.store(null);
    this.dispatchEvent(new CustomEvent("expired", { detail: reason }));
  }

  refresh() {
    if (!this.refreshing) {
      this.refreshing = this.refreshOnce().finally(() => {
        this.refreshing = null;
      });
    }
    return this.refreshing;
  }

  async refreshOnce() {
    const stale = this.state && this.state.access_token;
    if (!stale) throw new ApiError(401, { code: "not_signed_in" }, "Not signed in");
    const run = async () => {
      const latest = readStored();
      if (latest && latest.access_token !== stale) {
        // Another tab refreshed while we waited for the lock (the cookie it got is ours
        // too, the browser shares it): its access token is ours too.
        this.store(latest);
        return;
      }
      try {
        // No body: the browser sends the refresh and device cookies (same origin).
        const tokens = await request("POST", "/sessions/refresh");
        this.store(pairToState(tokens, this.user));
      } catch (error) {
        if (error.status === 401) this.expire("Your session has ended. Please sign in again.");
        throw error;
      }
    };
    if (navigator.locks) return navigator.locks.request("vod-session-refresh", run);
    return run();
  }

  // An authenticated request: refreshes first when the access token is (nearly) expired,
  // and once more on a 401; a failed refresh ends the session.
  async fetch(method, path, options = {}) {
    if (this.state && Date.now() > this.state.expires_at - 5000) await this.refresh();
    try {
      return await request(method, path, { ...options, token: this.accessToken });
    } catch (error) {
      if (error.status !== 401 || !this.state) throw error;
      await this.refresh();
      return request(method, path, { ...options, token: this.accessToken });
    }
  }

  // A fresh access token for things that are not fetch (XHR uploads, the WebSocket).
  async token() {
    if (this.state && Date.now() > this.state.expires_at - 5000) await this.refresh();
    return this.accessToken;
  }
}

function pairToState(tokens, user) {
  return {
    access_token: tokens.access_token,
    expires_at: Date.now() + tokens.expires_in * 1000,
    user,
  };
}

// One request to the API; resolves to the parsed body, rejects with an ApiError.
export async function request(method, path, { body, token, headers = {}, raw } = {}) {
  const init = { method, headers: { ...headers } };
  if (token) init.headers.Authorization = "Bearer " + token;
  if (raw !== undefined) {
    init.body = raw;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(API + path, init);
  } catch (error) {
    throw new ApiError(0, null, "Network error: " + error.message);
  }
  const parsed = await parseBody(response).catch(() => null);
  if (!response.ok) {
    const problem = parsed && typeof parsed === "object" ? parsed : null;
    throw new ApiError(response.status, problem, (problem && problem.detail) || response.statusText);
  }
  return parsed;
}
