// The page: hash routes, the header, and the views (list, sign in/up, upload).
import { ApiError, Session, describeError, request } from "./api.js";
import { formatBytes, formatDate, formatDuration, h } from "./dom.js";
import { Upload } from "./upload.js";
import { videoView } from "./video.js";

const session = new Session();
const main = document.getElementById("main");
const nav = document.getElementById("nav");
let cleanup = () => {};
let notice = null; // a message the next view shows once (e.g. why you were signed out)
// Focus moves to a new view's heading when the person navigates, not on the first load
// (where the first Tab must reach the skip link).
let navigated = false;

// The skip link's "#main" would be taken for a route: it moves focus instead.
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});

function go(hash) {
  if (location.hash === hash) render();
  else location.hash = hash;
}

function renderNav() {
  const links = [h("a", { href: "#/" }, "Videos"), h("a", { href: "#/upload" }, "Upload")];
  if (session.signedIn) {
    const name = (session.user && session.user.username) || "";
    links.push(
      h("span", { class: "who", "data-testid": "who" }, name),
      h("button", { type: "button", class: "link", onClick: signOut }, "Sign out"),
    );
  } else {
    links.push(h("a", { href: "#/signin" }, "Sign in"), h("a", { href: "#/signup" }, "Sign up"));
  }
  nav.replaceChildren(...links);
}

async function signOut() {
  await session.signOut();
  notice = "You are signed out.";
  go("#/signin");
}

session.addEventListener("change", renderNav);
session.addEventListener("expired", (event) => {
  notice = event.detail;
  go("#/signin");
});

function errorBox() {
  return h("p", { class: "error", role: "alert", hidden: true });
}

function showError(box, error) {
  box.textContent = describeError(error);
  box.hidden = false;
}

function field(label, input) {
  const id = input.id || "f-" + Math.random().toString(36).slice(2);
  input.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, label), input);
}

function setView(title, ...children) {
  document.title = title ? `${title} · vod` : "vod";
  const parts = [];
  if (notice) {
    parts.push(h("p", { class: "notice", role: "status" }, notice));
    notice = null;
  }
  main.replaceChildren(...parts, ...children);
  const heading = main.querySelector("h1");
  if (heading && navigated) {
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
  }
}

// ---- sign in / sign up ----------------------------------------------------------------

function authView(mode) {
  const signUp = mode === "signup";
  const username = h("input", { name: "username", autocomplete: "username", required: true, minLength: 3, maxLength: 32 });
  const password = h("input", {
    name: "password",
    type: "password",
    autocomplete: signUp ? "new-password" : "current-password",
    required: true,
    minLength: 8,
    maxLength: 128,
  });
  const error = errorBox();
  const submit = h("button", { type: "submit" }, signUp ? "Create account" : "Sign in");
  const form = h(
    "form",
    {
      class: "card narrow",
      onSubmit: async (event) => {
        event.preventDefault();
        submit.disabled = true;
        error.hidden = true;
        try {
          if (signUp) {
            await request("POST", "/users", { body: { username: username.value, password: password.value } });
          }
          await session.signIn(username.value, password.value);
          go("#/");
        } catch (err) {
          showError(error, err.status === 401 ? new Error("Wrong username or password.") : err);
        } finally {
          submit.disabled = false;
        }
      },
    },
    h("h1", {}, signUp ? "Create an account" : "Sign in"),
    field("Username", username),
    field("Password", password),
    signUp ? h("p", { class: "hint" }, "3–32 letters, digits, _ . or -; a password of at least 8 characters.") : null,
    error,
    submit,
    h(
      "p",
      { class: "hint" },
      signUp ? h("a", { href: "#/signin" }, "I already have an account") : h("a", { href: "#/signup" }, "Create an account"),
    ),
  );
  setView(signUp ? "Sign up" : "Sign in", form);
}

// ---- list and search ------------------------------------------------------------------

function videoCard(video) {
  return h(
    "li",
    { class: "video-card" },
    h(
      "a",
      { href: `#/videos/${encodeURIComponent(video.id)}`, class: "thumb-link" },
      video.thumbnail_url
        ? h("img", { src: video.thumbnail_url, alt: "", loading: "lazy", class: "thumb" })
        : h("div", { class: "thumb placeholder", "aria-hidden": "true" }, "▶"),
      h("span", { class: "video-title" }, video.title),
    ),
    h("p", { class: "meta" }, video.author.username, " · ", formatDate(video.created_at)),
  );
}

function listView(params) {
  const q = params.get("q") || "";
  const author = params.get("author") || "";
  const search = h("input", { type: "search", name: "q", value: q, placeholder: "Title or description" });
  const list = h("ul", { class: "video-grid", "aria-label": "Videos" });
  const more = h("button", { type: "button", hidden: true }, "Load more");
  const status = h("p", { class: "hint", role: "status" });
  const error = errorBox();
  let cursor = null;

  async function load() {
    more.disabled = true;
    error.hidden = true;
    const query = new URLSearchParams({ limit: "12" });
    if (q) query.set("q", q);
    if (author) query.set("author", author);
    if (cursor) query.set("cursor", cursor);
    try {
      const page = await request("GET", "/videos?" + query);
      list.append(...page.items.map(videoCard));
      cursor = page.next_cursor;
      more.hidden = !cursor;
      status.textContent = list.children.length ? "" : q ? `No videos match “${q}”.` : "No videos yet.";
    } catch (err) {
      showError(error, err);
    } finally {
      more.disabled = false;
    }
  }
  more.addEventListener("click", load);
  const form = h(
    "form",
    {
      class: "search",
      role: "search",
      onSubmit: (event) => {
        event.preventDefault();
        const next = new URLSearchParams();
        if (search.value.trim()) next.set("q", search.value.trim());
        go("#/" + (next.toString() ? "?" + next : ""));
      },
    },
    h("label", { for: "search-q", class: "visually-hidden" }, "Search videos"),
    Object.assign(search, { id: "search-q" }),
    h("button", { type: "submit" }, "Search"),
  );
  setView(q ? `Search: ${q}` : "", h("h1", {}, q ? `Videos matching “${q}”` : author ? `Videos by ${author}` : "Videos"), form, error, list, status, more);
  load();
}

// ---- upload ---------------------------------------------------------------------------

function uploadView() {
  if (!session.signedIn) {
    notice = "Sign in to upload a video.";
    go("#/signin");
    return;
  }
  const file = h("input", { type: "file", name: "file", accept: "video/*,.mp4,.webm,.mkv,.mov", required: true });
  const title = h("input", { name: "title", required: true, maxLength: 200 });
  const description = h("textarea", { name: "description", rows: 3, maxLength: 5000 });
  const bar = h("progress", { max: 100, value: 0, "aria-label": "Upload progress" });
  const figures = h("p", { class: "figures", "data-testid": "upload-figures" });
  const status = h("p", { class: "status", role: "status", "data-testid": "upload-status" });
  const progressBox = h("div", { class: "progress-box", hidden: true }, bar, figures, status);
  const error = errorBox();
  const submit = h("button", { type: "submit" }, "Upload and publish");
  let upload = null;

  // The title follows the picked file's name until the person types their own.
  let autoTitle = "";
  file.addEventListener("change", () => {
    const picked = file.files[0];
    if (picked && title.value === autoTitle) {
      autoTitle = picked.name.replace(/\.[^.]+$/, "");
      title.value = autoTitle;
    }
  });

  const form = h(
    "form",
    {
      class: "card",
      onSubmit: async (event) => {
        event.preventDefault();
        const picked = file.files[0];
        if (!picked) return;
        submit.disabled = true;
        error.hidden = true;
        progressBox.hidden = false;
        bar.value = 0;
        figures.textContent = "";
        status.textContent = "";
        upload = new Upload(session, picked);
        upload.addEventListener("status", (e) => (status.textContent = e.detail.text));
        upload.addEventListener("progress", (e) => {
          const { sent, total, speed, eta } = e.detail;
          bar.value = total ? Math.round((sent / total) * 100) : 100;
          figures.textContent =
            `${formatBytes(sent)} of ${formatBytes(total)}` +
            (speed ? ` · ${formatBytes(speed)}/s · ${formatDuration(eta)} left` : "");
        });
        try {
          const uploadId = await upload.run();
          status.textContent = "Publishing…";
          const video = await session.fetch("POST", "/videos", {
            body: { title: title.value, description: description.value, upload_id: uploadId },
          });
          go(`#/videos/${encodeURIComponent(video.id)}`);
        } catch (err) {
          showError(error, err);
          progressBox.hidden = true; // what failed is said above; no stale figures
        } finally {
          submit.disabled = false;
        }
      },
    },
    h("h1", {}, "Upload a video"),
    field("Video file", file),
    field("Title", title),
    field("Description", description),
    h("p", { class: "hint" }, "If an upload is interrupted, pick the same file again to resume where it stopped."),
    error,
    submit,
    progressBox,
  );
  setView("Upload", form);
  return () => upload && upload.cancel();
}

// ---- routing --------------------------------------------------------------------------

async function render() {
  cleanup();
  cleanup = () => {};
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  let done;
  if (path === "/signin") done = authView("signin");
  else if (path === "/signup") done = authView("signup");
  else if (path === "/upload") done = uploadView();
  else if (path.startsWith("/videos/")) {
    done = videoView({ main, session, setView, h, errorBox, showError, field, go, id: decodeURIComponent(path.slice(8)) });
  } else done = listView(params);
  if (typeof done === "function") cleanup = done;
}

window.addEventListener("hashchange", () => {
  navigated = true;
  render();
});

async function start() {
  if (session.signedIn) {
    try {
      // Checks the stored session still holds (refreshing it if needed).
      const user = await session.fetch("GET", "/users/me");
      session.store({ ...session.state, user });
    } catch (err) {
      // A failed refresh has already ended the session and sent the page to sign-in.
      if (!session.signedIn) return;
      if (err instanceof ApiError && err.status === 401) {
        session.expire("Your session has ended. Please sign in again.");
        return;
      }
    }
  }
  renderNav();
  render();
}

start();
