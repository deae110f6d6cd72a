// The participant app: invite → consent → camera check → pre-survey → chat → post-survey → rating → thanks.
// Plain JavaScript, no build step. Progress is kept in sessionStorage so a reload resumes where it was.
"use strict";

const API = "/api/v1";
const STORE_KEY = "emili-participant";
// WebSocket close codes after which reconnecting cannot help (4000 + the HTTP status of the reason).
const FATAL_CLOSE = new Set([4400, 4401, 4403, 4404, 4409, 4410]);
const FRAME_INTERVAL_MS = 1000;
const FACE_CHECK_INTERVAL_MS = 1500;

const state = Object.assign(
  { token: null, participantId: null, withdrawCode: null, study: null, sessionId: null, screen: null,
    consent: null, cameraOn: false, limitReached: false },
  JSON.parse(sessionStorage.getItem(STORE_KEY) || "{}"),
);
let media = null; // The camera stream, when on.
let socket = null;
let reconnectDelay = 1000;
let reconnectTimer = null;
let frameTimer = null;
let faceTimer = null;
let finished = false;
let waitingForReply = false;

const $ = (id) => document.getElementById(id);

function save() {
  const { token, participantId, withdrawCode, study, sessionId, screen, consent, cameraOn, limitReached } = state;
  sessionStorage.setItem(STORE_KEY, JSON.stringify(
    { token, participantId, withdrawCode, study, sessionId, screen, consent, cameraOn, limitReached }));
}

function show(screen) {
  for (const section of document.querySelectorAll(".screen")) section.hidden = section.id !== `screen-${screen}`;
  state.screen = screen;
  save();
  const heading = document.querySelector(`#screen-${screen} h1`);
  if (heading) heading.focus();
}

function setError(id, message) {
  $(id).textContent = message || "";
}

async function api(method, path, body, contentType) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let payload;
  if (body instanceof Blob) {
    payload = body;
    headers["Content-Type"] = contentType || body.type;
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(API + path, { method, headers, body: payload });
  } catch (err) {
    throw new Error("We could not reach the study server. Please check your internet connection and try again.");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const err = new Error(data.detail || `The server answered ${response.status}. Please try again.`);
    err.status = response.status;
    throw err;
  }
  return data;
}

function slug(text) {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");
}

function busy(button, on) {
  button.disabled = on;
  button.setAttribute("aria-busy", on ? "true" : "false");
}

// --- invite ----------------------------------------------------------------------------------------------

async function redeem(event) {
  event.preventDefault();
  setError("invite-error", "");
  const code = $("invite-code").value.trim();
  if (!code) {
    setError("invite-error", "Please enter the invite code from your link or email.");
    $("invite-code").focus();
    return;
  }
  busy($("invite-submit"), true);
  try {
    const data = await api("POST", `/invites/${encodeURIComponent(code)}/redeem`);
    Object.assign(state, {
      token: data.token, participantId: data.participant_id, withdrawCode: data.withdraw_code, study: data.study,
    });
    showConsent();
  } catch (err) {
    setError("invite-error", err.message);
  } finally {
    busy($("invite-submit"), false);
  }
}

// --- consent ---------------------------------------------------------------------------------------------

function showConsent() {
  $("study-name").textContent = state.study.name;
  $("consent-text").textContent = state.study.consent_text;
  show("consent");
}

function syncConsentBoxes() {
  const camera = $("consent-camera").checked;
  $("consent-store-frames").disabled = !camera;
  if (!camera) $("consent-store-frames").checked = false;
}

function submitConsent(event) {
  event.preventDefault();
  setError("consent-error", "");
  if (!$("consent-agree").checked) {
    setError("consent-error",
      "To take part, tick “I agree to take part”. If you do not want to, choose “I do not want to take part”.");
    $("consent-agree").focus();
    return;
  }
  state.consent = {
    agree: true,
    camera: $("consent-camera").checked,
    store_frames: $("consent-camera").checked && $("consent-store-frames").checked,
    use_for_training: $("consent-training").checked,
  };
  save();
  if (state.consent.camera) {
    startCameraCheck();
  } else if (state.study.without_camera === "stop") {
    stopStudy("This study needs the camera, so it cannot go on without it. Thank you for your interest.");
  } else {
    createSession(false);
  }
}

function decline() {
  state.token = null;
  state.study = null;
  show("declined");
  sessionStorage.removeItem(STORE_KEY);
}

function stopStudy(message) {
  stopCamera();
  $("declined-title").textContent = "Thank you";
  $("declined-text").textContent = message;
  show("declined");
  sessionStorage.removeItem(STORE_KEY);
}

// --- camera ----------------------------------------------------------------------------------------------

async function openCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw Object.assign(new Error("This browser cannot use a camera here (it needs a secure https page)."),
      { kind: "unsupported" });
  }
  try {
    return await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, facingMode: "user" }, audio: false,
    });
  } catch (err) {
    if (err.name === "NotAllowedError" || err.name === "SecurityError") {
      throw Object.assign(new Error(
        "Camera permission was denied. Allow the camera for this page (usually via the icon in the address bar), " +
        "then choose “Try the camera again”."), { kind: "denied" });
    }
    if (err.name === "NotFoundError" || err.name === "OverconstrainedError") {
      throw Object.assign(new Error("No camera was found on this device."), { kind: "missing" });
    }
    if (err.name === "NotReadableError") {
      throw Object.assign(new Error("The camera is in use by another app. Close it, then try again."),
        { kind: "busy" });
    }
    throw Object.assign(new Error(`The camera could not start (${err.name || "unknown error"}).`), { kind: "other" });
  }
}

function stopCamera() {
  clearInterval(faceTimer);
  clearInterval(frameTimer);
  if (media) for (const track of media.getTracks()) track.stop();
  media = null;
}

async function startCameraCheck() {
  show("camera");
  setError("camera-message", "");
  $("camera-continue").disabled = true;
  $("camera-retry").hidden = true;
  $("camera-skip").hidden = true;
  $("face-status").textContent = "Starting the camera…";
  $("face-status").classList.remove("ok");
  try {
    media = await openCamera();
  } catch (err) {
    $("face-status").textContent = "";
    const rule = state.study.without_camera === "continue"
      ? " You can also continue without the camera."
      : " This study needs the camera to go on.";
    setError("camera-message", err.message + rule);
    $("camera-retry").hidden = false;
    $("camera-skip").hidden = state.study.without_camera !== "continue";
    return;
  }
  $("camera-preview").srcObject = media;
  $("face-status").textContent = "Looking for your face…";
  clearInterval(faceTimer);
  faceTimer = setInterval(checkFace, FACE_CHECK_INTERVAL_MS);
}

function captureFrame(video) {
  return new Promise((resolve) => {
    if (!video.videoWidth) return resolve(null);
    const canvas = $("frame-canvas");
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    canvas.toBlob(resolve, "image/jpeg", 0.7);
  });
}

let checking = false;
async function checkFace() {
  if (checking) return;
  checking = true;
  try {
    const blob = await captureFrame($("camera-preview"));
    if (!blob) return;
    const result = await api("POST", "/camera-check", blob, "image/jpeg");
    if (result.face_found) {
      $("face-status").textContent = "Face found";
      $("face-status").classList.add("ok");
      $("camera-continue").disabled = false;
    } else {
      $("face-status").textContent = "No face found yet: make sure your face is well lit and in the picture.";
      $("face-status").classList.remove("ok");
    }
    setError("camera-message", "");
  } catch (err) {
    setError("camera-message", err.message);
  } finally {
    checking = false;
  }
}

// --- session ---------------------------------------------------------------------------------------------

async function createSession(cameraOn) {
  clearInterval(faceTimer);
  if (!cameraOn) stopCamera();
  state.cameraOn = cameraOn;
  const consent = Object.assign({}, state.consent, {
    camera: cameraOn, store_frames: cameraOn && state.consent.store_frames,
  });
  try {
    const session = await api("POST", "/sessions", { consent });
    state.sessionId = session.session_id;
    save();
    showPreSurvey();
  } catch (err) {
    if (err.status === 409 && !cameraOn && state.study.without_camera === "stop") {
      stopStudy(err.message);
      return;
    }
    const target = state.screen === "camera" ? "camera-message" : "consent-error";
    setError(target, err.message);
  }
}

function feelingBoxes(fieldsetId, prefix, feelings) {
  const fieldset = $(fieldsetId);
  fieldset.querySelectorAll(".choices").forEach((n) => n.remove());
  const box = document.createElement("div");
  box.className = "choices";
  for (const feeling of feelings) {
    const id = `${prefix}-${slug(feeling)}`;
    const wrap = document.createElement("div");
    wrap.className = "choice";
    const input = Object.assign(document.createElement("input"), { type: "checkbox", id, value: feeling });
    const label = Object.assign(document.createElement("label"), { htmlFor: id, textContent: feeling });
    wrap.append(input, label);
    box.append(wrap);
  }
  fieldset.append(box);
}

function checked(fieldsetId) {
  return [...$(fieldsetId).querySelectorAll("input:checked")].map((i) => i.value);
}

function showPreSurvey() {
  feelingBoxes("pre-current", "pre-current", state.study.current_feelings);
  feelingBoxes("pre-desired", "pre-desired", state.study.desired_feelings);
  show("pre-survey");
}

async function submitPreSurvey(event) {
  event.preventDefault();
  setError("pre-survey-error", "");
  const text = $("pre-survey-text").value.trim();
  if (!text) {
    setError("pre-survey-error", "Please write a sentence or two about how you feel.");
    $("pre-survey-text").focus();
    return;
  }
  busy($("pre-survey-submit"), true);
  try {
    await api("POST", `/sessions/${state.sessionId}/pre-survey`, {
      current_feelings: checked("pre-current"), desired_feelings: checked("pre-desired"), text,
    });
    startChat();
  } catch (err) {
    setError("pre-survey-error", err.message);
  } finally {
    busy($("pre-survey-submit"), false);
  }
}

// --- chat ------------------------------------------------------------------------------------------------

function addMessage(kind, text, turnId) {
  const node = document.createElement("div");
  node.className = `msg ${kind}`;
  if (turnId) node.dataset.turn = turnId;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = kind === "user" ? "You: " : kind === "assistant" ? "EMILI: " : "Readout: ";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  node.append(who, body);
  $("messages").append(node);
  $("messages").scrollTop = $("messages").scrollHeight;
  return node;
}

function assistantBubble(turnId) {
  const existing = $("messages").querySelector(`.msg.assistant[data-turn="${CSS.escape(turnId)}"]`);
  return existing || addMessage("assistant", "", turnId);
}

async function loadTranscript() {
  const transcript = await api("GET", `/sessions/${state.sessionId}/transcript`);
  $("messages").textContent = "";
  for (const entry of transcript.entries) {
    const kind = entry.kind === "user_message" ? "user" : entry.kind === "assistant_message" ? "assistant" : "readout";
    addMessage(kind, entry.text);
  }
}

function setLimit(detail) {
  state.limitReached = true;
  save();
  $("chat-limit").textContent = detail;
  $("chat-limit").hidden = false;
  $("chat-input").disabled = true;
  $("send").disabled = true;
  $("chat-finish").textContent = "Go on to the survey";
}

function updateTurns(turns, maxTurns) {
  $("turns-left").textContent = maxTurns ? `Messages: ${turns} of ${maxTurns}` : "";
}

async function startChat() {
  show("chat");
  finished = false;
  if (state.limitReached) setLimit("This conversation has ended. Please go on to the survey.");
  if (state.cameraOn && !media) {
    try {
      media = await openCamera();
    } catch (err) {
      state.cameraOn = false;
      setError("chat-error", `${err.message} The chat goes on without the camera.`);
    }
  }
  if (media) {
    $("self-view").srcObject = media;
    $("self-view").hidden = false;
  }
  connect();
  $("chat-input").focus();
}

function connect() {
  clearTimeout(reconnectTimer);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}${API}/sessions/${state.sessionId}/converse`);
  socket = ws;
  $("chat-status").textContent = "Connecting…";
  ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: state.token }));
  ws.onmessage = (event) => onServerMessage(JSON.parse(event.data));
  ws.onclose = (event) => {
    if (socket !== ws) return;
    socket = null;
    clearInterval(frameTimer);
    if (finished) return;
    if (FATAL_CLOSE.has(event.code)) {
      $("chat-status").textContent = "Disconnected.";
      if (!$("chat-error").textContent) setError("chat-error", event.reason || "The conversation was closed.");
      return;
    }
    $("chat-status").textContent = "Connection lost: reconnecting…";
    reconnectTimer = setTimeout(connect, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, 15000);
  };
}

function onServerMessage(message) {
  switch (message.type) {
    case "ready":
      reconnectDelay = 1000;
      waitingForReply = false;
      $("chat-status").textContent = "Connected";
      updateTurns(message.turns, message.max_turns);
      if (!state.limitReached) {
        $("send").disabled = false;
        $("chat-input").disabled = false;
      }
      loadTranscript().catch((err) => setError("chat-error", err.message));
      if (state.cameraOn && media) {
        clearInterval(frameTimer);
        frameTimer = setInterval(sendFrame, FRAME_INTERVAL_MS);
      }
      break;
    case "accepted":
      setError("chat-error", "");
      break;
    case "delta": {
      const text = assistantBubble(message.turn_id).querySelector(".text");
      text.textContent += message.text;
      $("messages").scrollTop = $("messages").scrollHeight;
      break;
    }
    case "message":
      assistantBubble(message.turn_id).querySelector(".text").textContent = message.text;
      if (!message.unprompted) {
        waitingForReply = false;
        if (!state.limitReached) $("send").disabled = false;
      }
      break;
    case "readout":
      $("readout").hidden = false;
      $("readout").textContent = message.text;
      break;
    case "limit":
      setLimit(message.detail);
      break;
    case "error":
      waitingForReply = false;
      if (!state.limitReached) $("send").disabled = false;
      if (message.error !== "rate_limited" || message.detail.indexOf("frames") === -1) {
        setError("chat-error", message.detail);
      }
      break;
    default:
      break;
  }
}

function sendMessage(event) {
  if (event) event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || waitingForReply || state.limitReached) return;
  if (!socket || socket.readyState !== WebSocket.OPEN) {
    setError("chat-error", "Not connected right now; your message is kept. Try again in a moment.");
    return;
  }
  setError("chat-error", "");
  socket.send(JSON.stringify({ type: "user_message", text, client_time_ms: Date.now() }));
  addMessage("user", text);
  $("chat-input").value = "";
  waitingForReply = true;
  $("send").disabled = true;
  const turns = $("turns-left").textContent.match(/(\d+) of (\d+)/);
  if (turns) updateTurns(Number(turns[1]) + 1, Number(turns[2]));
}

async function sendFrame() {
  if (!socket || socket.readyState !== WebSocket.OPEN || !media) return;
  const blob = await captureFrame($("self-view"));
  if (!blob) return;
  const reader = new FileReader();
  reader.onload = () => {
    if (!socket || socket.readyState !== WebSocket.OPEN) return;
    const jpeg = String(reader.result).split(",", 2)[1];
    socket.send(JSON.stringify({ type: "frame", jpeg_b64: jpeg, capture_time_ms: Date.now() }));
  };
  reader.readAsDataURL(blob);
}

function finishChat() {
  finished = true;
  clearTimeout(reconnectTimer);
  clearInterval(frameTimer);
  if (socket) socket.close(1000, "finished");
  socket = null;
  stopCamera();
  showPostSurvey();
}

// --- after the chat --------------------------------------------------------------------------------------

function showPostSurvey() {
  feelingBoxes("post-current", "post-current", state.study.current_feelings);
  show("post-survey");
}

async function submitPostSurvey(event) {
  event.preventDefault();
  setError("post-survey-error", "");
  const text = $("post-survey-text").value.trim();
  if (!text) {
    setError("post-survey-error", "Please write a sentence or two about how you feel now.");
    $("post-survey-text").focus();
    return;
  }
  busy($("post-survey-submit"), true);
  try {
    await api("POST", `/sessions/${state.sessionId}/post-survey`, { current_feelings: checked("post-current"), text });
    showRating();
  } catch (err) {
    setError("post-survey-error", err.message);
  } finally {
    busy($("post-survey-submit"), false);
  }
}

function showRating() {
  const box = $("rating-questions");
  box.textContent = "";
  const labels = state.study.likert_labels;
  for (const question of state.study.rating_questions) {
    const fieldset = document.createElement("fieldset");
    const legend = Object.assign(document.createElement("legend"), { textContent: question.question });
    const choices = document.createElement("div");
    choices.className = "choices";
    for (let score = 1; score <= 5; score++) {
      const id = `rating-${question.name}-${score}`;
      const wrap = document.createElement("div");
      wrap.className = "choice";
      const input = Object.assign(document.createElement("input"),
        { type: "radio", id, name: question.name, value: String(score) });
      const text = labels[score] ? `${score} (${labels[score]})` : String(score);
      wrap.append(input, Object.assign(document.createElement("label"), { htmlFor: id, textContent: text }));
      choices.append(wrap);
    }
    fieldset.append(legend, choices);
    box.append(fieldset);
  }
  show("rating");
}

async function submitRating(event) {
  event.preventDefault();
  setError("rating-error", "");
  const body = { comment: $("rating-comment").value.trim() };
  for (const question of state.study.rating_questions) {
    const picked = document.querySelector(`input[name="${question.name}"]:checked`);
    if (!picked) {
      setError("rating-error", `Please answer: ${question.question}`);
      document.querySelector(`input[name="${question.name}"]`).focus();
      return;
    }
    body[question.name] = Number(picked.value);
  }
  busy($("rating-submit"), true);
  try {
    await api("POST", `/sessions/${state.sessionId}/rating`, body);
    await api("POST", `/sessions/${state.sessionId}/end`);
    showThanks();
  } catch (err) {
    setError("rating-error", err.message);
  } finally {
    busy($("rating-submit"), false);
  }
}

function showThanks() {
  $("withdraw-code").textContent = state.withdrawCode || "";
  show("thanks");
}

// --- withdrawal ------------------------------------------------------------------------------------------

async function withdraw(event) {
  event.preventDefault();
  setError("withdraw-error", "");
  $("withdraw-result").textContent = "";
  $("withdraw-status").textContent = "";
  const code = $("withdraw-input").value.trim();
  if (!code) {
    setError("withdraw-error", "Please enter your withdraw code.");
    return;
  }
  busy($("withdraw-submit"), true);
  try {
    const result = await api("POST", "/withdraw", { withdraw_code: code });
    $("withdraw-result").textContent = result.detail;
    watchDeletion(code);
  } catch (err) {
    setError("withdraw-error", err.message);
  } finally {
    busy($("withdraw-submit"), false);
  }
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

function deletionText(removed) {
  const parts = [
    plural(removed.conversations, "conversation", "conversations") +
      ` (${plural(removed.events, "message or reading", "messages and readings")})`,
  ];
  if (removed.face_frames) parts.push(plural(removed.face_frames, "stored face image", "stored face images"));
  if (removed.labels) parts.push(plural(removed.labels, "emotion label", "emotion labels"));
  let text = `Deleted: ${parts.join(", ")}.`;
  if (removed.datasets_withdrawn) {
    text += ` ${plural(removed.datasets_withdrawn, "training dataset that held them was", "training datasets that held them were")}` +
      " withdrawn and will not be used to train models again.";
  }
  if (removed.models_marked) {
    text += ` ${plural(removed.models_marked, "model version had already learned", "model versions had already learned")}` +
      " from them; this is recorded" +
      (removed.models_retired ? `, and ${plural(removed.models_retired, "was", "were")} taken out of use.` : ".");
  }
  return text;
}

// After withdrawing: the data are deleted in the background; say what was removed once it is done.
async function watchDeletion(code, attempt = 0) {
  const status = $("withdraw-status");
  let result;
  try {
    result = await api("POST", "/withdraw/status", { withdraw_code: code });
  } catch (err) {
    status.textContent = "";
    return;
  }
  if (result.deleted && result.removed) {
    status.textContent = `${result.detail}. ${deletionText(result.removed)}`;
    return;
  }
  status.textContent = "Your data are being deleted; this page will say when it is done.";
  if (attempt < 120) setTimeout(() => watchDeletion(code, attempt + 1), 5000);
}

// --- start -----------------------------------------------------------------------------------------------

function resume() {
  if (state.study) $("study-name").textContent = state.study.name;
  switch (state.screen) {
    case "consent": return showConsent();
    case "camera": return startCameraCheck();
    case "pre-survey": return showPreSurvey();
    case "chat": return startChat();
    case "post-survey": return showPostSurvey();
    case "rating": return showRating();
    case "thanks": return showThanks();
    default: return show("invite");
  }
}

function init() {
  $("invite-form").addEventListener("submit", redeem);
  $("consent-form").addEventListener("submit", submitConsent);
  $("consent-camera").addEventListener("change", syncConsentBoxes);
  $("consent-decline").addEventListener("click", decline);
  $("camera-continue").addEventListener("click", () => createSession(true));
  $("camera-retry").addEventListener("click", startCameraCheck);
  $("camera-skip").addEventListener("click", () => createSession(false));
  $("pre-survey-form").addEventListener("submit", submitPreSurvey);
  $("chat-form").addEventListener("submit", sendMessage);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) sendMessage(event);
  });
  $("chat-finish").addEventListener("click", finishChat);
  $("post-survey-form").addEventListener("submit", submitPostSurvey);
  $("rating-form").addEventListener("submit", submitRating);
  $("withdraw-form").addEventListener("submit", withdraw);

  const path = location.pathname;
  if (path === "/withdraw") return show("withdraw");
  const join = path.match(/^\/join\/([A-Za-z0-9_-]+)$/);
  if (join && (!state.token || state.screen === "invite")) {
    $("invite-code").value = join[1];
    return show("invite");
  }
  if (state.token && state.study) return resume();
  return show("invite");
}

document.addEventListener("DOMContentLoaded", init);
