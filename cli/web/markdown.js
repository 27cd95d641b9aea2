// Markdown -> DOM nodes, for model output: every piece of text goes in with textContent or a text
// node, never as HTML, so "<img onerror=...>" or "<script>" in a reply is shown, not run.
// A small subset (fenced and indented code, headings, lists, quotes, rules, paragraphs; inline
// code, bold, italic, http(s) links) is enough for chat replies; an unclosed fence (a reply
// still streaming) shows as code. Links open in a new tab only when clicked: nothing is fetched.
"use strict";

const Markdown = (() => {
  function el(tag, cls) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    return node;
  }

  const INLINE = /(`+)([^`][\s\S]*?)\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|(?<![\w])__(?=\S)([\s\S]*?\S)__(?![\w])|\*(?=[^*\s])([^*]*?[^*\s])\*|(?<![\w])_(?=[^_\s])([^_]*?[^_\s])_(?![\w])|\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/g;

  function inline(text, parent) {
    let last = 0;
    const matches = [...text.matchAll(INLINE)];
    for (const m of matches) {
      if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
      if (m[1]) {
        const code = el("code");
        code.textContent = m[2];
        parent.append(code);
      } else if (m[3] || m[4]) {
        const b = el("strong");
        inline(m[3] || m[4], b);
        parent.append(b);
      } else if (m[5] || m[6]) {
        const i = el("em");
        inline(m[5] || m[6], i);
        parent.append(i);
      } else if (m[7]) {
        const a = el("a");
        a.href = m[8]; // only http(s) URLs match: no javascript: links
        a.rel = "noopener noreferrer nofollow";
        a.target = "_blank";
        inline(m[7], a);
        parent.append(a);
      }
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
  }

  function codeBlock(code, lang) {
    const box = el("div", "code");
    const head = el("div", "code-head");
    const label = el("span");
    label.textContent = lang || "code";
    const copy = el("button", "copy");
    copy.type = "button";
    copy.textContent = "Copy";
    copy.addEventListener("click", () => copyText(code, copy));
    head.append(label, copy);
    const pre = el("pre");
    const body = el("code");
    body.textContent = code;
    pre.append(body);
    box.append(head, pre);
    return box;
  }

  async function copyText(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (e) {
      const area = el("textarea");
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  }

  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;

  function starts(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
  }

  function blocks(lines, root) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) {
        i++;
      } else if ((m = line.match(FENCE))) {
        const fence = m[1], body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence)) body.push(lines[i++]);
        i++;
        root.append(codeBlock(body.join("\n"), m[2]));
      } else if (/^( {4}|\t)/.test(line)) {
        const body = [];
        while (i < lines.length && (/^( {4}|\t)/.test(lines[i]) || !lines[i].trim())) body.push(lines[i++].replace(/^( {4}|\t)/, ""));
        while (body.length && !body[body.length - 1].trim()) body.pop();
        root.append(codeBlock(body.join("\n"), ""));
      } else if ((m = line.match(HEADING))) {
        const h = el("h" + m[1].length);
        inline(m[2], h);
        root.append(h);
        i++;
      } else if (RULE.test(line)) {
        root.append(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        while (i < lines.length && (m = lines[i].match(QUOTE))) { body.push(m[1]); i++; }
        const q = el("blockquote");
        blocks(body, q);
        root.append(q);
      } else if ((m = line.match(ITEM))) {
        const ordered = /\d/.test(m[2]);
        const list = el(ordered ? "ol" : "ul");
        if (ordered && parseInt(m[2], 10) !== 1) list.start = parseInt(m[2], 10);
        while (i < lines.length && (m = lines[i].match(ITEM)) && /\d/.test(m[2]) === ordered) {
          const text = [m[3]];
          i++;
          while (i < lines.length && lines[i].trim() && !starts(lines[i])) text.push(lines[i++].trim());
          const li = el("li");
          inline(text.join("\n"), li);
          list.append(li);
          while (i < lines.length && !lines[i].trim() && i + 1 < lines.length && ITEM.test(lines[i + 1])) i++;
        }
        root.append(list);
      } else {
        const text = [];
        while (i < lines.length && lines[i].trim() && !(text.length && starts(lines[i]))) text.push(lines[i++]);
        const p = el("p");
        inline(text.join("\n"), p);
        root.append(p);
      }
    }
  }

  // Replace `root`'s children with `src` rendered.
  function render(src, root) {
    const frag = document.createDocumentFragment();
    blocks(String(src).replace(/\r\n?/g, "\n").split("\n"), frag);
    root.replaceChildren(frag);
  }

  return { render };
})();
