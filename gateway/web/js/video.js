// The video page: the player with its danmaku layer and live viewer count, the details
// (editable by the owner), and the comments.
import { ApiError, describeError, request } from "./api.js";
import { formatDate } from "./dom.js";

const DANMAKU_WINDOW_MS = 6 * 60 * 1000;
const LANES = 8;
const RECONNECT_MS = 3000;

export function videoView(ctx) {
  const { session, setView, h, errorBox, showError, field, go, id } = ctx;
  let closed = false;
  let socket = null;
  let reconnectTimer = null;
  const pageError = errorBox();
  setView("Video", h("p", { class: "hint", role: "status" }, "Loading…"), pageError);

  (async () => {
    let video;
    try {
      video = await request("GET", `/videos/${encodeURIComponent(id)}`);
    } catch (err) {
      if (closed) return;
      setView("Not found", h("h1", {}, err.status === 404 ? "This video does not exist (any more)." : "Could not load the video"), h("p", {}, describeError(err)), h("a", { href: "#/" }, "Back to the videos"));
      return;
    }
    if (closed) return;
    render(video);
  })();

  function render(video) {
    const player = h("video", { controls: true, preload: "metadata", src: video.stream_url, playsInline: true, "aria-label": `Video: ${video.title}` });
    const layer = h("div", { class: "danmaku-layer", "aria-hidden": "true" });
    const viewers = h("span", { class: "viewers", "data-testid": "viewers" }, "");
    const title = h("h1", { class: "video-heading" }, video.title);
    const description = h("p", { class: "description" }, video.description || "");
    const meta = h("p", { class: "meta" }, "by ", h("a", { href: `#/?author=${encodeURIComponent(video.author.username)}` }, video.author.username), " · ", formatDate(video.created_at), " · ", viewers);
    const isOwner = session.user && session.user.id === video.author.id;
    const owner = isOwner ? ownerTools(video, title, description) : null;
    setView(
      video.title,
      h("div", { class: "player", role: "region", "aria-label": "Video player" }, player, layer),
      title,
      meta,
      description,
      owner,
      danmakuForm(player, layer),
      comments(video, isOwner),
    );
    startDanmaku(video, player, layer);
    connectLive(viewers, layer, player);
  }

  // ---- owner: edit and delete -------------------------------------------------------

  function ownerTools(video, titleEl, descriptionEl) {
    const error = errorBox();
    const titleInput = h("input", { name: "title", value: video.title, required: true, maxLength: 200 });
    const descriptionInput = h("textarea", { name: "description", rows: 3 });
    descriptionInput.value = video.description || "";
    const editForm = h(
      "form",
      {
        class: "card",
        hidden: true,
        onSubmit: async (event) => {
          event.preventDefault();
          try {
            const updated = await session.fetch("PATCH", `/videos/${encodeURIComponent(video.id)}`, {
              body: { title: titleInput.value, description: descriptionInput.value },
            });
            Object.assign(video, updated);
            titleEl.textContent = updated.title;
            descriptionEl.textContent = updated.description || "";
            document.title = `${updated.title} · vod`;
            editForm.hidden = true;
            editButton.focus();
          } catch (err) {
            showError(error, err);
          }
        },
      },
      field("Title", titleInput),
      field("Description", descriptionInput),
      h("div", { class: "row" }, h("button", { type: "submit" }, "Save"), h("button", { type: "button", class: "secondary", onClick: () => { editForm.hidden = true; editButton.focus(); } }, "Cancel")),
    );
    const editButton = h("button", { type: "button", class: "secondary", onClick: () => { editForm.hidden = false; titleInput.focus(); } }, "Edit");
    const confirmBox = h(
      "div",
      { class: "confirm", hidden: true, role: "group", "aria-label": "Confirm deletion" },
      h("span", {}, "Delete this video for everyone?"),
      h("button", {
        type: "button",
        class: "danger",
        onClick: async () => {
          try {
            await session.fetch("DELETE", `/videos/${encodeURIComponent(video.id)}`);
            go("#/");
          } catch (err) {
            showError(error, err);
          }
        },
      }, "Yes, delete"),
      h("button", { type: "button", class: "secondary", onClick: () => { confirmBox.hidden = true; deleteButton.focus(); } }, "Keep it"),
    );
    const deleteButton = h("button", { type: "button", class: "danger", onClick: () => { confirmBox.hidden = false; confirmBox.querySelector("button").focus(); } }, "Delete");
    return h("section", { class: "owner", "aria-label": "Manage your video" }, h("div", { class: "row" }, editButton, deleteButton), confirmBox, editForm, error);
  }

  // ---- danmaku ----------------------------------------------------------------------

  const shown = new Set();
  const loadedWindows = new Set();
  let items = [];
  // Just before the position last looked at: a danmaku at exactly 0 ms (or at a seek
  // target) is shown too.
  let lastTime = -1;
  let lane = 0;

  function show(item, layer) {
    if (shown.has(item.id)) return;
    shown.add(item.id);
    const el = h("span", { class: `danmaku ${item.mode}`, "data-id": item.id }, item.content);
    // White (the stylesheet's) unless the sender chose a colour.
    if (/^#[0-9a-f]{6}$/i.test(item.color || "")) el.style.color = item.color;
    if (item.mode === "scroll") {
      el.style.top = `${(lane++ % LANES) * 1.6 + 0.3}em`;
      el.style.setProperty("--distance", `${layer.clientWidth}px`);
    }
    el.addEventListener("animationend", () => {
      el.remove();
      shown.delete(item.id); // played again after a seek back, it shows again
    });
    layer.append(el);
  }

  async function loadWindow(video, index) {
    if (loadedWindows.has(index)) return;
    loadedWindows.add(index);
    const from = index * DANMAKU_WINDOW_MS;
    try {
      const page = await request("GET", `/videos/${encodeURIComponent(video.id)}/danmaku?from_ms=${from}&to_ms=${from + DANMAKU_WINDOW_MS - 1}`);
      items = items.concat(page.items).sort((a, b) => a.offset_ms - b.offset_ms);
    } catch {
      loadedWindows.delete(index); // try again on the next time update
    }
  }

  function startDanmaku(video, player, layer) {
    loadWindow(video, 0);
    player.addEventListener("seeking", () => {
      lastTime = player.currentTime * 1000 - 1;
    });
    player.addEventListener("timeupdate", () => {
      const now = player.currentTime * 1000;
      loadWindow(video, Math.floor(now / DANMAKU_WINDOW_MS));
      if (!player.paused) {
        for (const item of items) {
          if (item.offset_ms > lastTime && item.offset_ms <= now) show(item, layer);
        }
      }
      lastTime = now;
    });
  }

  function danmakuForm(player, layer) {
    if (!session.signedIn) {
      return h("p", { class: "hint" }, h("a", { href: "#/signin" }, "Sign in"), " to send danmaku and comments.");
    }
    const content = h("input", { name: "danmaku", maxLength: 100, required: true, placeholder: "Say something at this moment" });
    const mode = h("select", { name: "mode" }, h("option", { value: "scroll" }, "Scrolling"), h("option", { value: "top" }, "Top"), h("option", { value: "bottom" }, "Bottom"));
    const color = h("input", { type: "color", name: "color", value: "#ffffff" });
    const error = errorBox();
    return h(
      "form",
      {
        class: "danmaku-form",
        "aria-label": "Send a danmaku",
        onSubmit: async (event) => {
          event.preventDefault();
          error.hidden = true;
          try {
            const sent = await session.fetch("POST", `/videos/${encodeURIComponent(id)}/danmaku`, {
              body: { offset_ms: Math.round(player.currentTime * 1000), content: content.value, mode: mode.value, color: color.value },
            });
            content.value = "";
            // Shown at once to its sender; the live echo (same id) is then skipped.
            if (sent && sent.id) show(sent, layer);
          } catch (err) {
            showError(error, err);
          }
        },
      },
      field("Danmaku", content),
      field("Position", mode),
      field("Colour", color),
      h("button", { type: "submit" }, "Send"),
      error,
    );
  }

  function connectLive(viewers, layer, player) {
    if (closed) return;
    (async () => {
      const token = session.signedIn ? await session.token().catch(() => null) : null;
      if (closed) return;
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      const query = token ? `?access_token=${encodeURIComponent(token)}` : "";
      socket = new WebSocket(`${scheme}://${location.host}/api/v1/videos/${encodeURIComponent(id)}/live${query}`);
      socket.addEventListener("message", (event) => {
        let message;
        try {
          message = JSON.parse(event.data);
        } catch {
          return;
        }
        if (message.type === "viewers") {
          viewers.textContent = `${message.count} watching`;
        } else if (message.type === "danmaku") {
          items.push(message);
          items.sort((a, b) => a.offset_ms - b.offset_ms);
          show(message, layer); // live: shown now, whatever the player's position
        }
      });
      socket.addEventListener("close", (event) => {
        socket = null;
        if (closed || event.code === 4404 || event.code === 1000) return;
        reconnectTimer = setTimeout(() => connectLive(viewers, layer, player), RECONNECT_MS);
      });
    })();
  }

  // ---- comments ---------------------------------------------------------------------

  function comments(video, isOwner) {
    const list = h("ol", { class: "comments", "aria-label": "Comments" });
    const more = h("button", { type: "button", class: "secondary", hidden: true }, "More comments");
    const error = errorBox();
    let cursor = null;

    function item(comment) {
      const mine = session.user && comment.author && session.user.id === comment.author.id;
      const li = h(
        "li",
        { class: "comment" },
        h("p", { class: "meta" }, comment.author ? comment.author.username : "someone", " · ", formatDate(comment.created_at)),
        h("p", { class: "content" }, comment.content),
      );
      if (mine || isOwner) {
        li.append(h("button", {
          type: "button",
          class: "link",
          "aria-label": "Delete comment",
          onClick: async () => {
            try {
              await session.fetch("DELETE", `/videos/${encodeURIComponent(video.id)}/comments/${encodeURIComponent(comment.id)}`);
              li.remove();
            } catch (err) {
              if (err instanceof ApiError && err.status === 404) li.remove();
              else showError(error, err);
            }
          },
        }, "Delete"));
      }
      return li;
    }

    async function load() {
      try {
        const query = new URLSearchParams({ limit: "50" });
        if (cursor) query.set("cursor", cursor);
        const page = await request("GET", `/videos/${encodeURIComponent(video.id)}/comments?${query}`);
        list.append(...page.items.map(item));
        cursor = page.next_cursor;
        more.hidden = !cursor;
      } catch (err) {
        showError(error, err);
      }
    }
    more.addEventListener("click", load);
    load();

    let form = null;
    if (session.signedIn) {
      const content = h("textarea", { name: "comment", rows: 2, maxLength: 2000, required: true });
      form = h(
        "form",
        {
          class: "comment-form",
          "aria-label": "Post a comment",
          onSubmit: async (event) => {
            event.preventDefault();
            error.hidden = true;
            try {
              const comment = await session.fetch("POST", `/videos/${encodeURIComponent(video.id)}/comments`, { body: { content: content.value } });
              content.value = "";
              if (!cursor) list.append(item(comment)); // oldest first: new ones go last
            } catch (err) {
              showError(error, err);
            }
          },
        },
        field("Add a comment", content),
        h("button", { type: "submit" }, "Post comment"),
      );
    }
    return h("section", { class: "comments-section", "aria-labelledby": "comments-heading" }, h("h2", { id: "comments-heading" }, "Comments"), list, more, form, error);
  }

  return () => {
    closed = true;
    clearTimeout(reconnectTimer);
    if (socket) socket.close(1000, "left the page");
  };
}
