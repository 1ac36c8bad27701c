// Types of streamer.mjs: the same as streamer.js's (streamer.d.ts).
export * from "./streamer.js";
export { default } from "./streamer.js";
