// The console's only script of its own (served from this origin; the CSP allows no
// inline script). A "line N" button next to a rules error puts the editor's caret on
// that line and selects it, so the error is found at its field. A "Copy" button
// (data-copy: the id of a field) copies that field's value, e.g. a new key's secret.
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-line]");
  if (!button) return;
  const editor = document.getElementById(button.getAttribute("aria-controls"));
  if (!editor) return;
  const lines = editor.value.split("\n");
  const line = Math.min(Math.max(parseInt(button.dataset.line, 10), 1), lines.length);
  const start = lines.slice(0, line - 1).reduce((n, text) => n + text.length + 1, 0);
  editor.focus();
  editor.setSelectionRange(start, start + lines[line - 1].length);
  const height = editor.scrollHeight / Math.max(lines.length, 1);
  editor.scrollTop = Math.max(0, (line - 3) * height);
});

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const field = document.getElementById(button.dataset.copy);
  const status = document.getElementById("copy-status");
  if (!field) return;
  const say = (text) => { if (status) status.textContent = text; };
  try {
    await navigator.clipboard.writeText(field.value);
    say("Copied to the clipboard.");
  } catch (error) {
    field.focus();
    field.select(); // no clipboard access (not a secure context): selected to copy by hand
    say(document.execCommand("copy") ? "Copied to the clipboard." : "Selected: press Ctrl+C to copy.");
  }
});
