// React's UMD build (a global) as the ES module `import ... from "react"` names.
const React = window.React;
export default React;
export const { createElement, useCallback, useEffect, useRef, useState } = React;
